"""Resolve a MODEL argument (`fixture`, a local folder, a hub id), load it, fingerprint it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LayerpruneError
from .adapter import ModelAdapter, spec_for
from .gguf import NAMED_MODELS, converted, named_model_file, source_of
from .precision import cpu_native_bf16, dtype_name, parse_dtype

FIXTURE_DIR = Path(__file__).resolve().parent / "fixture"
# Config fields that say nothing about the function a model computes.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash", "architectures"}


def hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") != 1
        or os.sep + os.sep in name
    )


def resolve(name: str, quiet: bool = False) -> tuple[str, Path | None]:
    """Return (what from_pretrained takes, the local folder or None for a hub id).

    A `.gguf` file or a named model (`smollm2`) resolves to its cached safetensors conversion."""
    if name == "fixture":
        if not (FIXTURE_DIR / "config.json").exists():
            raise LayerpruneError(f"the bundled fixture is missing from {FIXTURE_DIR}; reinstall layerprune")
        return str(FIXTURE_DIR), FIXTURE_DIR
    if name in NAMED_MODELS and not Path(name).exists():
        folder = converted(named_model_file(name), quiet=quiet)
        return str(folder), folder
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            folder = converted(path, quiet=quiet)
            return str(folder), folder
        if not path.is_dir():
            raise LayerpruneError(
                f"model path {name} is a file; pass the folder that holds config.json, or a .gguf file"
            )
        if not os.access(path, os.R_OK | os.X_OK):
            raise LayerpruneError(f"model folder {name} is not readable; check its permissions")
        if not (path / "config.json").is_file():
            raise LayerpruneError(
                f"{name} has no config.json: not a Hugging Face model folder (save one with save_pretrained)"
            )
        return str(path), path
    if _looks_like_path(name):
        raise LayerpruneError(
            f"model path {name} does not exist; pass a model folder, a .gguf file, a hub id, 'fixture' or 'smollm2'"
        )
    if hub_offline():
        raise LayerpruneError(
            f"'{name}' is not a local folder and the Hugging Face hub is unreachable; "
            "download it where there is a network and pass its folder, or use 'fixture'"
        )
    return name, None


def check_weights(folder: Path | None) -> None:
    """Every safetensors file of a local model opens (its header covers the file): a truncated or
    corrupt download is one line naming the file, not a traceback from deep inside a load."""
    if folder is None:
        return
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise LayerpruneError(
                f"{file} is corrupt or truncated ({str(e).splitlines()[0]}); "
                "download or export the model again"
            ) from None


def load_config(name: str, quiet: bool = False):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    source, path = resolve(name, quiet=quiet)
    doc = _decilm_config(path) if path is not None else None
    if doc is not None:  # DeciLM / Nemotron-NAS: read natively, no remote code
        from .decilm import llama_config

        config = llama_config(doc, f"{name}/config.json")
        spec_for(config)
        return config
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise LayerpruneError(f"cannot read the config of {name}: {str(e).splitlines()[0]}") from None
    # BERT-like encoders are listed as causal LMs too (their *LMHeadModel); they are not decoders.
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder or config.is_encoder_decoder:
        raise LayerpruneError(
            f"{name} is a '{config.model_type}' model, not a causal LM; layerprune prunes decoder LMs"
        )
    spec_for(config)  # unsupported architecture: fail before loading any weight
    return config


# The stages where `--dtype auto` computes in bf16 on a CPU that does bf16 in hardware
# (precision.cpu_native_bf16). Chosen by bench/precision.py on SmolLM2 (bf16 against float32 in one
# process): scoring by perplexity (1.9x faster), block influence (2.6x) and angular distance (1.1x) keep
# the same ranking of blocks, which is all a depth plan reads of them. Left in float32: evaluation (the
# measurement every comparison rests on; 1.2x faster but 0.2 % off), Taylor+ and Shapley (slower in
# bf16), the pruners (SparseGPT's masks 92 % equal, Wanda's 99.6 %: they change the model), the searches
# and recovery (float32 master weights make bf16 no faster here).
CPU_BF16_STAGES = frozenset({"score:ppl", "score:bi", "score:angular"})
# Pins what `auto` means on a CPU, whatever the stage (e.g. float32 for results that must not depend on
# the machine's CPU); a GPU is not affected.
CPU_DTYPE_ENV = "LAYERPRUNE_CPU_DTYPE"


def default_dtype(device: str, config=None, stage: str | None = None) -> torch.dtype:
    """What `--dtype auto` computes in: the checkpoint's dtype on a GPU (what GPU users run). On a CPU,
    bfloat16 for the `stage`s of CPU_BF16_STAGES when the CPU does bf16 in hardware, float32 otherwise
    (CPUs without native bf16 run bf16 matmuls many times slower); $LAYERPRUNE_CPU_DTYPE pins it."""
    if torch.device(device).type == "cuda":
        return (_dtype_of(config) if config is not None else None) or torch.float32
    pinned = os.environ.get(CPU_DTYPE_ENV, "").strip()
    if pinned:
        try:
            dtype = parse_dtype(pinned)
        except LayerpruneError as e:
            raise LayerpruneError(f"${CPU_DTYPE_ENV}: {e}") from None
        if dtype != "auto":
            return dtype
    if stage in CPU_BF16_STAGES and cpu_native_bf16():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    """cuda when there is one (under torchrun: the local rank's GPU), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local % torch.cuda.device_count()}" if world > 1 else "cuda"


def check_device(device: str) -> str:
    """A device this machine has, or one line saying which it has instead."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LayerpruneError(f"--device '{device}' is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if not torch.backends.cuda.is_built()
                else "no GPU is visible"
            )
            raise LayerpruneError(f"--device {device}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LayerpruneError(
                f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type == "mps":
        # Refused, not half-supported: MPS has no float64, in which the statistics and losses are
        # accumulated, and lacks ops the pruners use on many torch versions (kthvalue, SVD).
        raise LayerpruneError(f"--device {device}: Apple MPS is not supported (no float64); use --device cpu")
    elif dev.type not in ("cpu", "cuda"):
        raise LayerpruneError(f"--device {device}: unsupported device type; use cpu or cuda")
    return device


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    adapter: ModelAdapter
    path: Path | None  # the local folder, None for a hub id
    source_dtype: torch.dtype | None = None  # the checkpoint's dtype: exports are written in it
    origin: dict | None = None  # what the weights were converted from (a GGUF: file, quantization, sha256)
    _fingerprint: str | None = field(default=None, repr=False)
    _rounded: dict = field(default_factory=dict, repr=False)  # dtype -> fingerprint_as(dtype)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            offload = self.adapter.offload
            self._fingerprint = model_fingerprint(self.model, tensor=offload.tensor if offload else None)
        return self._fingerprint

    @property
    def offloaded(self) -> bool:
        """True when the blocks stay on disk and come in one at a time (load(..., max_memory=))."""
        return self.adapter.offload is not None

    def modified(self) -> None:
        """Call after changing the weights in place: the fingerprint is computed anew."""
        self._fingerprint = None
        self._rounded.clear()

    def fingerprint_as(self, dtype: torch.dtype) -> str:
        """The fingerprint this model would have if loaded in `dtype` (its weights rounded to it)."""
        if dtype == self.dtype:
            return self.fingerprint
        if dtype not in self._rounded:
            offload = self.adapter.offload
            self._rounded[dtype] = model_fingerprint(
                self.model, tensor=offload.tensor if offload else None, as_dtype=dtype
            )
        return self._rounded[dtype]

    def same_model(self, recorded: dict) -> bool:
        """Whether a score's or plan's `model` record (fingerprint, dtype) was made on this model. A record
        made in a narrower dtype (scores in bf16 on a CPU, `--dtype auto`) matches this model's weights
        rounded to that dtype: the same checkpoint, loaded for another stage."""
        fingerprint = recorded.get("fingerprint")
        if fingerprint == self.fingerprint:
            return True
        try:
            other = parse_dtype(recorded.get("dtype") or "auto")
        except LayerpruneError:
            return False
        if other == "auto" or other.itemsize >= self.dtype.itemsize:  # a wider dtype cannot be rebuilt
            return False
        return fingerprint == self.fingerprint_as(other)

    def dtype_hint(self, recorded: dict) -> str:
        """For a refusal of a record made in another dtype: which `--dtype` to load with instead."""
        other = recorded.get("dtype")
        if not other or other == dtype_name(self.dtype):
            return ""
        return (
            f" (it was computed in {other}, this load is {dtype_name(self.dtype)}: load with --dtype {other})"
        )

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (its embedding's; every parameter has it)."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def numerics(self) -> dict:
        """What changes a result's numbers beside the weights: the compute dtype and the device type.
        Recorded with every score, plan, evaluation and export; part of every cache's key."""
        return {"dtype": dtype_name(self.dtype), "device": self.device.type}

    @property
    def numerics_key(self) -> str:
        """`numerics` as one short key: 'float32@cpu', 'bfloat16@cuda'."""
        n = self.numerics
        return f"{n['dtype']}@{n['device']}"


def load(
    name: str,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    quiet: bool = False,
    max_memory: int | str | None = None,
    stage: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for pruning. `dtype`: 'auto' (default: the checkpoint's
    dtype on a GPU; on a CPU float32, or bfloat16 for the `stage`s that gain from it on a CPU with
    native bf16, e.g. stage="score:ppl": see CPU_BF16_STAGES), 'float32', 'bfloat16', 'float16' or a
    torch dtype.

    `max_memory` (bytes, or "8GB"): when the weights exceed it, the blocks stay in the checkpoint's
    safetensors shards and come in one at a time (models/offload.py); the embeddings and head plus
    one block must fit in it."""
    from .offload import parse_size

    max_memory = parse_size(max_memory)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    device = check_device(device) if device else default_device()
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per rank
        device = default_device()
    config = load_config(name, quiet=quiet)
    source, path = resolve(name, quiet=quiet)
    check_weights(path)
    dtype = parse_dtype(dtype)
    if dtype is None or dtype == "auto":
        dtype = default_dtype(device, config, stage)
    tokenizer = read_tokenizer(source, config, name)  # a missing tokenizer fails before any weight is read
    if max_memory is not None:
        offloaded = _load_offloaded(name, source, path, config, device, dtype, max_memory, tokenizer)
        if offloaded is not None:
            return offloaded
    try:
        if getattr(config, "layerprune_deploy", None) == "decilm":
            from .decilm import load_model

            model = load_model(source, config, dtype)
        elif getattr(config, "layerprune_block_configs", None):  # width-pruned, shapes differ per block
            from .shrink import load_shrunk

            model = load_shrunk(source, config, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise LayerpruneError(f"cannot load {name}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    adapter = ModelAdapter(model)
    _silence_removed_parts(adapter)
    return LoadedModel(
        name, model, tokenizer, adapter, path, source_dtype=_dtype_of(config), origin=source_of(path)
    )


def _decilm_config(folder: str | Path) -> dict | None:
    """The config.json of a local folder when it is a DeciLM / nemotron-nas one, else None (no such
    file, or one that does not read: transformers' own reading says what is wrong)."""
    from .decilm import MODEL_TYPE

    try:
        doc = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError alike
        return None
    return doc if isinstance(doc, dict) and doc.get("model_type") == MODEL_TYPE else None


def read_tokenizer(source: str, config, name: str):
    """The tokenizer; never remote code. For a DeciLM checkpoint transformers reads its config.json
    as a generic config first and warns that it is one (and of its rope_scaling key): silenced.
    A folder without one that transformers can read is one line naming the files to copy."""
    import contextlib
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # a tokenizer read without the model's config (`eval FILE.gguf --engine llama.cpp`, --imatrix): the folder's
    quiet = getattr(config, "layerprune_deploy", None) == "decilm" or (
        config is None and _decilm_config(source) is not None
    )
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        if quiet:
            warnings.simplefilter("ignore", FutureWarning)
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            stack.callback(hf_logging.set_verbosity, level)
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError) as e:  # ValueError: no tokenizer.json, and no slow one it can convert
            raise LayerpruneError(_no_tokenizer(name, source, e)) from None


def _no_tokenizer(name: str, source: str, error: Exception) -> str:
    """Why the tokenizer of a model folder cannot be read, and what to do (transformers' own advice,
    to install sentencepiece or tiktoken, is right only where a slow tokenizer's file is there)."""
    folder = Path(source)
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if folder.is_dir() and not (folder / "tokenizer.json").is_file():
        if (folder / "tokenizer.model").is_file():
            return (
                f"cannot read the tokenizer of {name}: its tokenizer.model needs sentencepiece "
                f"(pip install sentencepiece), or copy the model's tokenizer.json into {folder}"
            )
        return (
            f"{name} has no tokenizer.json; copy the tokenizer files (tokenizer.json, tokenizer_config.json) "
            f"of the model it was made from into {folder}"
        )
    if not folder.is_dir():  # a hub id
        return f"cannot load the tokenizer of {name}: {first}"
    return (
        f"cannot read the tokenizer of {name} ({first}); "
        f"copy the tokenizer files of the model it was made from into {folder} again"
    )


def _silence_removed_parts(adapter: ModelAdapter) -> None:
    """Parts zeroed by a depth plan run as no-ops (same function, no compute)."""
    removed_parts = getattr(adapter.config, "layerprune_removed_parts", None)
    if removed_parts:
        from .adapter import Unit

        adapter.silence_parts([Unit.parse(u) for u in removed_parts])


def _load_offloaded(name, source, path, config, device, dtype, max_memory, tokenizer) -> LoadedModel | None:
    """The model with its blocks offloaded, or None when its weights fit in max_memory."""
    from .offload import checkpoint_bytes, load_offloaded

    if getattr(config, "layerprune_block_configs", None) or getattr(config, "layerprune_deploy", None):
        raise LayerpruneError(f"{name} was width-pruned (per-block shapes); load it without --max-memory")
    if path is None:  # a hub id: its files, fetched once into the hub cache
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
        )
    compute = dtype if isinstance(dtype, torch.dtype) else (_dtype_of(config) or torch.float32)
    total, sizes = checkpoint_bytes(path, compute)
    if total <= max_memory:
        return None
    model, adapter, _ = load_offloaded(path, config, device, compute, max_memory, sizes)
    _silence_removed_parts(adapter)
    return LoadedModel(
        name, model, tokenizer, adapter, path, source_dtype=_dtype_of(config), origin=source_of(path)
    )


def _dtype_of(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def model_fingerprint(model: torch.nn.Module, samples: int = 1024, tensor=None, as_dtype=None) -> str:
    """A short hash of what the model computes: its config and a strided sample of every tensor.

    Values are hashed as float32, so the same weights loaded in bf16 and in fp32 agree; any pruning
    (removed blocks, zeroed weights, changed shapes) changes it. Reading a few thousand values per
    tensor keeps it fast on models of any size. `tensor(name)`: where to read a tensor that is not
    in memory (offloaded blocks), one at a time; the hash is the same as the in-memory model's.
    `as_dtype`: hash the weights rounded to that dtype, as a load in it would hold them."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        if p.device.type == "meta" and tensor is not None:
            p = tensor(name)
        flat = p.detach().reshape(-1)
        if as_dtype is not None and flat.is_floating_point():
            flat = flat.to(as_dtype)
        # float32 positions, as always (fingerprints stay what they were); past 2^24 values the last
        # one can round up beyond the end, hence the clamp
        idx = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        idx.clamp_(max=flat.numel() - 1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
        h.update(str(flat.numel() - int(torch.count_nonzero(flat))).encode())  # no int64 temporary
    return h.hexdigest()[:16]
