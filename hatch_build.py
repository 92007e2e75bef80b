"""Build hooks.

- The wheel ships the one file `sqliteq.py` as the package `sqliteq` with a `py.typed` marker
  (PEP 561 types packages only), so type checkers read its annotations. An editable install
  instead puts the repository on the path, so the file itself is imported.
- The package's long description is README.md with its links into the repository (a picture,
  an example) written as plain file names: a package index has no repository to resolve them
  against. Links to the README's own sections and to full URLs stay.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.metadata.plugin.interface import MetadataHookInterface

# ![text](path) and [text](path), where path is neither "#section" nor "scheme://..."
RELATIVE_LINK = re.compile(r"(!?)\[([^\]]*)\]\((?![#]|[a-z]+://)([^)]+)\)")


def _without_relative_links(markdown: str) -> str:
    def plain(link: re.Match[str]) -> str:
        image, text, path = link.groups()
        return f"{text} (`{path}` in the source)" if image else f"{text} (`{path}`)"
    return RELATIVE_LINK.sub(plain, markdown)


class OneFileAsTypedPackage(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "wheel" and version == "standard":
            build_data["force_include"]["sqliteq.py"] = "sqliteq/__init__.py"
            build_data["force_include"]["py.typed"] = "sqliteq/py.typed"


class ReadmeForAnIndex(MetadataHookInterface):
    def update(self, metadata: dict[str, Any]) -> None:
        readme = (Path(self.root) / "README.md").read_text(encoding="utf-8")
        metadata["readme"] = {"content-type": "text/markdown",
                              "text": _without_relative_links(readme)}
