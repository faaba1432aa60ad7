"""Calibration and evaluation text: where it comes from.

A source is one of:
- `fixture:val`, `fixture:test` — the bundled model's held-out text; `fixture:train` — a 5% slice of its
  training split (for recovery; never evaluate on it);
- a local `.txt` file (one document), `.jsonl` file (one document per line: {"text": ...} or a
  string), or a folder of those (sorted, recursively);
- a named dataset, `wikitext2`, `ptb`, `c4`, `bookcorpus`, with an optional `:train|val|test`
  split, through `datasets` when a network exists. Offline, a name fails at once and names the
  local alternative.
Documents are joined with a blank line ("\\n\\n"), the convention of the perplexity protocol.
They are cut into token windows in windows.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerpruneError
from ..models.loading import FIXTURE_DIR, hub_offline

JOIN = "\n\n"

NAMED = {
    "wikitext2": {
        "args": ("wikitext", "wikitext-2-raw-v1"),
        "splits": {"train": "train", "val": "validation", "test": "test"},
        "field": "text",
    },
    "ptb": {
        "args": ("ptb_text_only", "penn_treebank"),
        "splits": {"train": "train", "val": "validation", "test": "test"},
        "field": "sentence",
    },
    "c4": {
        "args": ("allenai/c4",),
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-01024.json.gz",
        },
        "splits": {"train": "train", "val": "validation", "test": "validation"},
        "field": "text",
    },
    "bookcorpus": {"args": ("bookcorpus",), "splits": {"train": "train"}, "field": "text"},
}


@dataclass
class Text:
    name: str  # how the source was named, e.g. "fixture:test", "wikitext2:test", a path
    documents: list[str]
    _text: str | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = JOIN.join(self.documents)
        return self._text

    @property
    def sha256(self) -> str:
        """The joined text's sha256 (hex), computed once."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.text.encode()).hexdigest()
        return self._sha256

    @property
    def fingerprint(self) -> str:
        return self.sha256[:16]


def _split_of(spec: str, default: str) -> tuple[str, str]:
    name, _, split = spec.partition(":")
    split = {"validation": "val", "valid": "val"}.get(split, split) or default
    return name, split


def load_text(source: str, default_split: str = "test") -> Text:
    """Read a text source (see module docstring). `default_split` applies to named datasets."""
    if source.startswith("fixture:") or source == "fixture":
        split = source.partition(":")[2] or default_split
        if split not in ("train", "val", "test"):
            raise LayerpruneError(
                f"fixture has splits train, val and test, not '{split}'; use fixture:train, fixture:val or fixture:test"
            )
        path = FIXTURE_DIR / "data" / f"{split}.txt"
        if not path.exists():
            raise LayerpruneError(f"{path} is missing; reinstall layerprune")
        return _checked(Text(f"fixture:{split}", [path.read_text(encoding="utf-8")]))
    path = Path(source).expanduser()
    if path.exists():
        return _checked(Text(source, _read_local(path)))
    name, split = _split_of(source, default_split)
    if name in NAMED:
        return _checked(_load_named(name, split))
    raise LayerpruneError(
        f"text source '{source}' is not a file, a folder, fixture:val|test, or one of {', '.join(NAMED)}"
    )


def _checked(text: Text) -> Text:
    if not any(d.strip() for d in text.documents):
        raise LayerpruneError(f"text source {text.name} is empty; give it some text")
    return text


def json_lines(path: Path, lines: list[str], shape: str) -> Iterator[tuple[int, object]]:
    """(line number, object) of each non-blank line; a line that is not JSON is an error naming
    `path:line` and the `shape` each line must have."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise LayerpruneError(f"{path}:{n} is not valid JSON; each line must be {shape}") from None


def read_utf8(path: Path) -> str:
    """A text file the user gave; one that is not UTF-8 (UTF-16, as PowerShell's `>` writes, or
    binary) is one line saying how to make it readable. A UTF-8 byte-order mark (PowerShell 5's
    `Out-File -Encoding utf8`) is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            head = f.read(2)
        utf16 = head in (b"\xff\xfe", b"\xfe\xff")
        what = "UTF-16 (what PowerShell's > writes)" if utf16 else f"not UTF-8 text (at byte {e.start})"
        raise LayerpruneError(
            f"cannot read {path}: it is {what}; save it as UTF-8 "
            "(iconv -t UTF-8, or PowerShell's Out-File -Encoding utf8)"
        ) from None
    except OSError as e:
        raise LayerpruneError(
            f"cannot read {path}: {e.strerror or e}; check the path and its permissions"
        ) from None


def _read_local(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise LayerpruneError(f"folder {path} has no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix not in (".txt", ".jsonl", ".raw", ".tokens"):
            raise LayerpruneError(
                f'cannot read {f}: use a .txt file, a .jsonl file ({{"text": ...}} per line) or a folder'
            )
        content = read_utf8(f)
        if f.suffix != ".jsonl":
            docs.append(content)
            continue
        for n, obj in json_lines(f, content.splitlines(), '{"text": ...}'):
            text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise LayerpruneError(f'{f}:{n} has no "text" field')
            docs.append(text)
    return docs


def _load_named(name: str, split: str) -> Text:
    info = NAMED[name]
    if split not in info["splits"]:
        raise LayerpruneError(f"{name} has splits {', '.join(info['splits'])}, not '{split}'")
    local = "a local .txt/.jsonl file or folder, or fixture:val / fixture:test"
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or hub_offline():
        raise LayerpruneError(f"dataset '{name}' needs a network and none is reachable; use {local}")
    try:
        import datasets
    except ImportError:
        raise LayerpruneError(
            f"dataset '{name}' needs the datasets package: pip install datasets; or use {local}"
        ) from None
    kwargs = {"data_files": info["data_files"]} if "data_files" in info else {}
    ds = datasets.load_dataset(*info["args"], split=info["splits"][split], **kwargs)
    return Text(f"{name}:{split}", [row[info["field"]] for row in ds])
