"""GGUF output through llama.cpp's own converter (`convert_hf_to_gguf.py`, with the `gguf` package
of the same llama.cpp), for every pruned model: depth-pruned and uniformly narrowed models convert as
`llama` (or whatever their architecture is), DeciLM ones (`--deploy decilm`) as `deci`.

The converter is found, in order, at `converter=` (a llama.cpp folder, or the script in it),
`$LAYERPRUNE_LLAMA_CPP`, a llama.cpp that `bench/serve.py` unpacked into the layerprune cache
(`$LAYERPRUNE_CACHE/llama.cpp/<version>/src/vendor/llama.cpp`, from the llama-cpp-python source
distribution, which vendors it), or the converter alone that `make setup` unpacks from the same
source distribution into the environment (`<sys.prefix>/share/layerprune/llama.cpp`,
`install_converter`). It runs in a subprocess (`_convert_gguf.py`); the output is
written next to its destination under a temporary name and renamed when complete.

Refused before converting: a model that is not a checkpoint folder, an output inside the model,
a layerprune per-block checkpoint (`layerprune_block_configs`: no engine reads it; re-make the plan
with --deploy decilm), a depth plan's silenced parts (their zeroed weights would be computed), and a
DeciLM block that keeps its attention without an MLP (llama.cpp's `deci` runtime drops that
attention's output).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ..errors import LayerpruneError
from ..io import check_destination, publish, temp_file_beside

ENV = "LAYERPRUNE_LLAMA_CPP"
SCRIPT = "convert_hf_to_gguf.py"
CONVERTER_PARTS = (SCRIPT, "conversion/", "gguf-py/")  # what the script imports from its folder
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


def cache_root() -> Path:
    from ..io import cache_root as root

    return root() / "llama.cpp"


def find_converter(converter: str | Path | None = None) -> Path:
    """The llama.cpp folder whose convert_hf_to_gguf.py to run; one line naming the fix otherwise."""
    if converter is not None:
        path = Path(converter).expanduser()
        path = path.parent if path.name == SCRIPT else path
        if not (path / SCRIPT).is_file():
            raise LayerpruneError(f"--converter {converter}: no {SCRIPT} there; pass a llama.cpp folder")
        return path
    if os.environ.get(ENV):
        return find_converter(os.environ[ENV])
    found = sorted(cache_root().glob(f"*/src/vendor/llama.cpp/{SCRIPT}"))
    if found:
        return found[-1].parent
    if (env_converter() / SCRIPT).is_file():
        return env_converter()
    raise LayerpruneError(
        "GGUF export needs llama.cpp's converter: pass --converter LLAMA_CPP_DIR (a llama.cpp checkout), set "
        f"{ENV}, run `make setup` (it unpacks the converter into the environment), or run `python bench/serve.py --setup` once"
    )


def env_converter() -> Path:
    """Where `install_converter` puts the converter by default: inside this Python environment."""
    return Path(sys.prefix) / "share" / "layerprune" / "llama.cpp"


def install_converter(sdist: str | Path, dest: str | Path | None = None) -> Path:
    """Unpack llama.cpp's converter (the script, its `conversion` package and `gguf-py`) from a
    llama-cpp-python source distribution into `dest` (default: `env_converter()`); the folder.
    Unpacked beside it and renamed, so a crash leaves no half converter."""
    dest = Path(dest) if dest is not None else env_converter()
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [
            m for m in t.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_PARTS)
            and (m.isfile() or m.isdir())
        ]  # fmt: skip
        if not any(m.name == prefix + SCRIPT for m in members):
            raise LayerpruneError(
                f"{sdist}: no vendor/llama.cpp/{SCRIPT}; pass a llama-cpp-python source distribution"
            )
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for m in members:
            m.name = m.name[len(prefix) :]
            t.extract(m, tmp, filter="data")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def check_convertible(model_dir: Path) -> dict:
    """The model's config.json, if llama.cpp can serve the model as it is; LayerpruneError otherwise."""
    from ..io import read_json

    if not (model_dir / "config.json").is_file():
        raise LayerpruneError(f"{model_dir} has no config.json: pass a model folder that layerprune wrote")
    doc = read_json(model_dir / "config.json", "config", "layerprune apply")
    if doc.get("layerprune_block_configs"):
        raise LayerpruneError(
            f"{model_dir} has per-block widths in layerprune's own format, which no engine reads; "
            "re-make the plan with --deploy decilm (DeciLM blocks convert to llama.cpp's deci)"
        )
    if doc.get("layerprune_removed_parts"):
        raise LayerpruneError(
            f"{model_dir} keeps zeroed attention / MLP parts that llama.cpp would compute; prune whole blocks "
            "(--unit block), or use a width plan with --deploy decilm to remove parts"
        )
    for i, b in enumerate(doc.get("block_configs") or []):
        if not (b.get("attention") or {}).get("no_op") and (b.get("ffn") or {}).get("no_op"):
            raise LayerpruneError(
                f"{model_dir}: block {i} keeps its attention without an MLP, whose output llama.cpp's deci "
                "runtime drops (src/models/deci.cpp); remove both or neither"
            )
    return doc


def check_gguf_output(model_dir: Path, out: Path, overwrite: bool) -> None:
    """Before any work: the output is a new *.gguf outside the model folder (or --overwrite), and the
    folder is of a kind llama.cpp's converter takes."""
    if out.suffix.lower() != ".gguf":
        raise LayerpruneError(f"{out}: name the output file *.gguf")
    if out.exists() and not overwrite:
        raise LayerpruneError(f"{out} already exists; choose another path or pass --overwrite")
    check_destination(out, {"model folder": model_dir})
    check_convertible(model_dir)


def to_gguf(
    model_dir: str | Path,
    out: str | Path,
    *,
    outtype: str | None = None,
    converter: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = True,
) -> Path:
    """Convert a model folder to one .gguf file with llama.cpp's converter; the file's path.
    `outtype` None: the type the folder's weights are stored in (f32, bf16 or f16)."""
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    if outtype is None:
        outtype = stored_outtype(model_dir)
    if outtype not in OUTTYPES:
        raise LayerpruneError(f"--outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    check_gguf_output(model_dir, out, overwrite)
    # what the converter would fail on after loading the model, in its own words, is refused here
    from .loading import check_weights, read_tokenizer

    check_weights(model_dir)
    read_tokenizer(str(model_dir), None, str(model_dir))
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file_beside(out)  # named after this process: a killed run's is removed by the next
        os.close(fd)
    except OSError as e:
        _remove_empty(made)
        raise LayerpruneError(
            f"cannot write {out} ({e.strerror or e}); choose a --gguf path in a folder you can write"
        ) from None
    try:
        root = find_converter(converter)
        cmd = [sys.executable, "-m", "layerprune.models._convert_gguf", str(root), str(model_dir),
               "--outfile", str(tmp), "--outtype", outtype]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
            raise LayerpruneError(
                f"llama.cpp's converter failed on {model_dir}: {lines[-1] if lines else f'exit {r.returncode}'}"
            )
        if not quiet:
            print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "", file=sys.stderr)
        publish(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise
    return out


_ST_OUTTYPES = {"F32": "f32", "BF16": "bf16", "F16": "f16"}


def stored_outtype(model_dir: Path) -> str:
    """The GGUF type that keeps a folder's weights as they are stored: its first floating tensor's
    (f32 when there is none to read: the converter then says what is wrong)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    kind = f.get_slice(key).get_dtype()
                    if kind in _ST_OUTTYPES:
                        return _ST_OUTTYPES[kind]
        except (SafetensorError, OSError):
            break
    return "f32"


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders an export created (deepest first) where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def architecture(gguf_file: str | Path) -> str:
    """general.architecture of a GGUF file (through the gguf package)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_file)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()
