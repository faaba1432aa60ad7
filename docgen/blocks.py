"""The code blocks of README.md and docs/ that are marked runnable, as tests/test_docs.py runs them.

A block runs when the line above its fence is `<!-- run -->`; `<!-- run: smollm2=fixture -->` runs
it with each word on the left replaced by the one on the right (a quick start shown on the real
model, tested on the bundled one). The blocks of one file run in order in one folder, as a reader
following the page would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import ROOT

MARK = re.compile(
    r"^<!-- run(?::(?P<subs>[^>]*))? -->[ \t]*\n```(?P<lang>[\w-]+)[^\n]*\n(?P<code>.*?)^```[ \t]*$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str  # sh, bash, console or python
    code: str  # with the substitutions made

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(files: list[Path] | None = None) -> list[Block]:
    out = []
    for f in files or pages():
        text = f.read_text(encoding="utf-8")
        for m in MARK.finditer(text):
            code = m.group("code")
            for pair in (m.group("subs") or "").split():
                old, new = pair.split("=", 1)
                code = re.sub(rf"\b{re.escape(old)}\b", new, code)
            out.append(Block(f, text.count("\n", 0, m.start()) + 2, m.group("lang"), code))
    return out


def commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment-only lines dropped."""
    out, current = [], ""
    for line in code.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out
