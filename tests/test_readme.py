"""The README's Python blocks run, in order, in one interpreter in a fresh folder, so the docs
cannot rot. A block marked `<!-- not run: why -->` on the line before its fence is skipped."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from support import REPO, clean_env

# Each block runs as its own compiled unit, so a failure names the block and its line.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for number, code in json.load(sys.stdin):
    exec(compile(code, f"README.md python block {number}", "exec"), namespace)
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(ordinal among the Python blocks, code) of every block not marked as not run."""
    blocks = re.finditer(r"(?:<!-- not run: [^>]*-->\n)?```python\n(.*?)```", text, re.S)
    return [(number, block.group(1)) for number, block in enumerate(blocks, start=1)
            if not block.group(0).startswith("<!--")]


def test_every_python_block_of_the_readme_runs_in_order(tmp_path: Path) -> None:
    blocks = python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 5
    ran = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks),
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=clean_env(PYTHONPATH=str(REPO)))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "{'sent': True}\n", ran.stdout
