"""Build hook: the wheel ships the one file `sqliteq.py` as the package `sqliteq` with a
`py.typed` marker (PEP 561 types packages only), so type checkers read its annotations. An
editable install instead puts the repository on the path, so the file itself is imported."""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class OneFileAsTypedPackage(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["sqliteq.py"] = "sqliteq/__init__.py"
            build_data["force_include"]["py.typed"] = "sqliteq/py.typed"
