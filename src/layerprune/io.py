"""Atomic writes: every artifact appears whole or not at all, with the modes a plain write would
give it, and never over, around or inside an input of the command.

Temporaries carry their owner (`.<name>.<pid>-<host>.<random>.tmp` next to the destination,
`<tmp>/layerprune-<kind>-<pid>-<host>.<random>` for scratch folders), so the next run that makes one
removes those of a run that was killed (SIGKILL cannot be caught), and never one a live run owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import LayerpruneError

Inputs = Mapping[str, "str | Path | None"] | Iterable["str | Path | None"]


# ---- the one rule for destinations -------------------------------------------------------------
def check_destination(out: str | Path, inputs: Inputs, option: str = "-o") -> None:
    """Refuse, before any work, a destination that is an input of the command, lies inside one (we
    never modify an input) or contains one (replacing it would delete the input). `inputs`: paths,
    or {what: a path or a list of paths}; one not on disk (fixture:val, a hub id) can only be equal."""
    named = inputs.items() if isinstance(inputs, Mapping) else (("", p) for p in inputs)
    named = [(w, g) for w, given in named for g in (given if isinstance(given, (list, tuple)) else [given])]
    target = Path(out).expanduser().resolve()
    for what, given in named:
        if given is None or str(given) == "":
            continue
        path = Path(given).expanduser()
        src, label = path.resolve(), f"{what + ' ' if what else ''}{given}"
        if target == src:  # even before it exists: a store the command is about to create
            raise LayerpruneError(f"output {out} is the input {label}; write it somewhere else ({option})")
        if not path.exists():
            continue
        if src in target.parents:
            raise LayerpruneError(
                f"output {out} is inside the input {label}; write it somewhere else ({option})"
            )
        if target in src.parents:
            raise LayerpruneError(
                f"output {out} contains the input {label}, which writing it would delete; "
                f"write it somewhere else ({option})"
            )


def check_file_path(path: str | Path) -> None:
    """A file output must not name an existing folder (a rename over it would fail late)."""
    if Path(path).is_dir():
        raise LayerpruneError(
            f"output {path} is a folder; give a file path to -o, e.g. {Path(path) / 'out.json'}"
        )


# ---- modes: what open() and mkdir() would have given -------------------------------------------
def _umask() -> int:
    try:  # Linux: read without changing it (changing it races with other threads creating files)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: str | Path) -> None:
    """Give a temporary (mkstemp's 0600, mkdtemp's 0700) and, for a folder, everything in it (the
    safetensors library also writes 0600) the modes a plain write would have given them under the
    process umask (0644 and 0755 under 022), so a server running as another user can read them."""
    mask = _umask()
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ---- temporaries, and those of killed runs -----------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
_RANDOM = r"[a-z0-9_]{8}"  # tempfile's names, and secrets.token_hex(4)


def owner_tag() -> str:
    """`<pid>-<host>`: which process made a temporary (the host: a folder shared by several machines)."""
    return f"{os.getpid()}-{_HOST}"


def _dead(pid: int, host: str) -> bool:
    """Whether the process that owns a temporary is gone; another host's, or a doubt, counts as alive."""
    if host != _HOST or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def stale(folder: Path, pattern: str) -> list[Path]:
    """Entries of `folder` whose name matches `pattern` (with groups pid and host) and whose owner is dead."""
    regex = re.compile(pattern)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = []
    for name in names:
        m = regex.fullmatch(name)
        if m and _dead(int(m["pid"]), m["host"]):
            found.append(folder / name)
    return found


def beside_pattern(path: Path, suffix: str = r"(?:tmp|old)") -> str:
    """The names of the temporaries next to `path` (see temp_dir_beside)."""
    return rf"\.{re.escape(path.name)}\.(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]+)\.{_RANDOM}\.{suffix}"


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries that killed runs left next to `path`; the removed paths."""
    path = _absolute(path)
    found = stale(path.parent, beside_pattern(path))
    for p in found:
        _remove(p)
    return found


def temp_dir_beside(path: str | Path) -> Path:
    """A new hidden folder next to `path` (same file system: one rename puts it in place), after
    removing those that killed runs left there."""
    path = _absolute(path)
    remove_stale(path)
    try:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp"))
    except BaseException:  # Ctrl-C or SIGTERM between its creation and our hands: not left behind
        _discard_own(path)
        raise


def temp_file_beside(path: str | Path) -> tuple[int, Path]:
    """A new hidden file next to `path` (an open descriptor and its path), as temp_dir_beside."""
    path = _absolute(path)
    remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp")
    except BaseException:
        _discard_own(path)
        raise
    return fd, Path(tmp)


def _discard_own(path: Path) -> None:
    """This process's temporaries next to `path` (one being created when an interruption came)."""
    tag = re.escape(owner_tag())
    for name in os.listdir(path.parent):
        if re.fullmatch(rf"\.{re.escape(path.name)}\.{tag}\.{_RANDOM}\.tmp", name):
            _remove(path.parent / name)


CACHE_ENV = "LAYERPRUNE_CACHE"


def cache_root() -> Path:
    """layerprune's cache: $LAYERPRUNE_CACHE, else $XDG_CACHE_HOME/layerprune, else ~/.cache/layerprune
    (converted GGUF models, llama.cpp's tools, ESD metrics, level databases, importance matrices)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "layerprune"


def writable_cache(sub: str) -> Path:
    """`cache_root() / sub`, created; one line naming the fix when it cannot be written, checked before
    the work whose result goes there (a conversion, a level database)."""
    folder = cache_root() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise LayerpruneError(
            f"the layerprune cache {folder} cannot be written ({e.strerror or e}); point {CACHE_ENV} at a "
            "folder you can write, or unset it (default ~/.cache/layerprune)"
        ) from None
    return folder


def scratch_dir(kind: str) -> Path:
    """A private working folder in the system's temporary folder, `layerprune-<kind>-<pid>-<host>.*`
    (activations, offloaded blocks), after removing those of killed runs."""
    root = Path(tempfile.gettempdir())
    for p in stale(root, rf"layerprune-{kind}-(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]+)\.{_RANDOM}"):
        shutil.rmtree(p, ignore_errors=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f"layerprune-{kind}-{owner_tag()}."))
    except BaseException:  # interrupted as it was made
        for name in os.listdir(root):
            if re.fullmatch(rf"layerprune-{kind}-{re.escape(owner_tag())}\.{_RANDOM}", name):
                shutil.rmtree(root / name, ignore_errors=True)
        raise


def _absolute(path: str | Path) -> Path:
    """An absolute path whose name is the destination's own (`-o .` names the current folder);
    lexical, so a symbolic link given as the destination is replaced, not its target."""
    return Path(os.path.abspath(Path(path).expanduser()))


# ---- the writers -------------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str, inputs: Inputs = ()) -> Path:
    path = Path(path)
    check_destination(path, inputs)
    check_file_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = temp_file_beside(path)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any, inputs: Inputs = ()) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n", inputs)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, inputs: Inputs = ()) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` in one rename.
    `inputs`: what the command reads, which `path` must not be, contain or lie inside."""
    given, path = path, _absolute(path)
    check_destination(given, inputs)
    if not path.name:
        raise LayerpruneError(f"output {given} is the root folder; write it somewhere else (-o)")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise LayerpruneError(f"output folder {given} already exists; choose another -o or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = temp_dir_beside(path)
        yield tmp
        publish(tmp)
        if path.exists() or path.is_symlink():
            # the old output (a folder, or a file -o named) steps aside under a name of ours, then goes
            old = path.with_name(f".{path.name}.{owner_tag()}.{secrets.token_hex(4)}.old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


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
