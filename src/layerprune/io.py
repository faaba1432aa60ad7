"""Atomic writes: every artifact appears whole or not at all, and never inside the input model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import LayerpruneError


def check_file_path(path: str | Path) -> None:
    """A file output must not name an existing folder (a rename over it would fail late)."""
    if Path(path).is_dir():
        raise LayerpruneError(
            f"output {path} is a folder; give a file path to -o, e.g. {Path(path) / 'out.json'}"
        )


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    check_file_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LayerpruneError(f"output folder {path} already exists; choose another -o or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_outside(output: str | Path, model_dir: str | Path | None) -> None:
    """Refuse to write anything inside the folder of the input model: we never modify it."""
    if model_dir is None:
        return
    out = Path(output).resolve()
    src = Path(model_dir).resolve()
    if out == src or src in out.parents:
        raise LayerpruneError(
            f"output {output} is inside the input model folder {model_dir}; write it somewhere else (-o)"
        )


def read_json(path: str | Path, what: str, make_hint: str) -> dict:
    """A JSON object from a file a user gave us; every failure is one line naming the fix."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LayerpruneError(f"{what} {path} does not exist; make one with `{make_hint}`") from None
    except IsADirectoryError:
        raise LayerpruneError(f"{what} {path} is a folder; pass the JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerpruneError(f"cannot read {what} {path}: {e}; make a new one with `{make_hint}`") from None
    if not isinstance(doc, dict):
        raise LayerpruneError(f"{path} is not a layerprune {what}: a JSON object was expected")
    return doc


def read_document(path: str | Path, fmt: str, what: str, make_hint: str) -> dict:
    """A JSON artifact of ours (scores) with its format tag checked; errors name the fix."""
    doc = read_json(path, what, make_hint)
    if doc.get("format") != fmt:
        raise LayerpruneError(f"{path} is not a layerprune {what} (format {fmt})")
    return {k: v for k, v in doc.items() if k != "format"}


def check_writable(path: str | Path) -> None:
    """An output's folder (or, where it is still to be made, its nearest existing parent) takes a
    new file: an unwritable destination is refused before the work, not after it."""
    folder = Path(path).expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise LayerpruneError(
            f"cannot write {path} ({folder}: {'a file, not a folder' if e.errno == 20 else e.strerror or e}); "
            "choose an output in a folder you can write"
        ) from None
