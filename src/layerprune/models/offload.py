"""Models larger than memory: blocks stay in their safetensors shards and come in one at a time.

`load(..., max_memory=...)` builds the model on the meta device (accelerate's `init_empty_weights`)
when its weights exceed `max_memory`, loads what lives outside the blocks (embeddings, final norm,
head: small next to the blocks of a large model), and leaves every block's parameters on meta.
`OffloadedBlocks.resident(i)` brings block i from the shards (`safetensors.safe_open`, placed by
accelerate's `set_module_tensor_to_device`) onto the compute device for the length of a `with`, and
sends it back to meta afterwards. A block that was changed there (pruned) is written, as it is done,
to a temporary safetensors file that later reads prefer; the export streams every tensor, one at a
time, into shards laid out like the input's.

Every sequential path asks for residency through the adapter (`adapter.resident(i)`): the
calibration walk of Wanda / SparseGPT / magnitude / OWL / Wanda-sp, the mask engine (leave-one-out,
SLEB, Shapley, angular, block influence), ESD metrics, Taylor+ (a block-by-block backward), width
and depth pruning (removed blocks keep reading from their old places; the export renumbers them),
and perplexity. Recovery training and lm-eval's zero-shot run whole forwards and refuse an
offloaded model with a one-line error.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import LayerpruneError
from ..io import scratch_dir

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(text: str | int | None) -> int | None:
    """Bytes from 2GB / 1.5GiB / 500MB / a plain number (accelerate's parser)."""
    if text is None or isinstance(text, int):
        return text
    from accelerate.utils import convert_file_size_to_int

    text = str(text).strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        size = -1
    if not isinstance(size, int) or size <= 0:
        raise LayerpruneError(f"--max-memory '{text}' is not a size; write it like 8GB, 1.5GiB or 500MB")
    return size


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: shard file} of a safetensors checkpoint (sharded with an index, or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    raise LayerpruneError(
        f"{folder} has no safetensors weights; --max-memory reads safetensors shards "
        "(re-save the model with save_pretrained(..., safe_serialization=True))"
    )


def checkpoint_bytes(folder: Path, dtype: torch.dtype) -> tuple[int, dict[str, int]]:
    """(total parameter bytes in `dtype`, {tensor name: bytes}) from the shards' headers alone."""
    sizes: dict[str, int] = {}
    per_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_files(folder).items():
        per_file.setdefault(file, []).append(name)
    width = torch.empty(0, dtype=dtype).element_size()
    for file, names in per_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                shape = f.get_slice(name).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                sizes[name] = numel * width
    return sum(sizes.values()), sizes


def release_freed_memory() -> None:
    """glibc: hand the heap's free pages back to the system (malloc_trim), a no-op elsewhere.

    Blocks coming in and going out let glibc's dynamic mmap threshold grow to the size of a weight
    tensor; freed tensors and activations then stay in the heap, fragmented, and the resident memory of
    a streamed walk grows by about one activation per block. Trimming as each block leaves keeps it flat
    (SmolLM2 Wanda, 16 x 512 windows: peak 1137 MB without, 858 MB with; a fixed 1 MiB threshold gave
    874 MB but tripled the system time in page faults)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


class OffloadedBlocks:
    """The blocks of a meta-device model, read from its shards one at a time."""

    def __init__(self, model, adapter, folder: Path, device: str, dtype: torch.dtype):
        self.model, self.adapter = model, adapter
        self.folder, self.device, self.dtype = Path(folder), torch.device(device), dtype
        self.files = checkpoint_files(self.folder)
        self.prefix = next(n for n, m in model.named_modules() if m is adapter.blocks)
        self._overlay = scratch_dir("blocks")
        # removed by close(), or at the latest when the interpreter exits (an interrupted command
        # unwinds to the CLI's exit with the model still referenced from a cycle that __del__ misses)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._overlay), True)
        self.origin = list(range(adapter.num_blocks))  # checkpoint index of each block (depth pruning)
        self._changed: dict[int, Path] = {}  # by checkpoint index: the overlay file of a changed block
        self._depth: dict[int, int] = {}
        self.loads = 0  # blocks brought in (for benchmarks)
        self._writes = 0

    # ---- names -------------------------------------------------------------------------------
    def block_names(self, i: int) -> list[str]:
        block = self.adapter.blocks[i]
        return [f"{self.prefix}.{i}.{n}" for n in block.state_dict()]

    def block_of(self, name: str) -> int | None:
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        return int(name[len(head) :].split(".", 1)[0])

    def source(self, name: str) -> str:
        """The checkpoint's name of a tensor of the model as it is now (blocks may have been removed)."""
        i = self.block_of(name)
        if i is None:
            return name
        rest = name[len(self.prefix) + 1 :].split(".", 1)[1]
        return f"{self.prefix}.{self.origin[i]}.{rest}"

    def remove(self, indices) -> None:
        """Blocks deleted from the model (ModelAdapter.remove_blocks): forget their place."""
        drop = set(indices)
        self.origin = [o for j, o in enumerate(self.origin) if j not in drop]

    # ---- reading -----------------------------------------------------------------------------
    def _read(self, name: str) -> torch.Tensor:
        i = self.block_of(name)
        name = self.source(name)
        file = self._changed.get(self.origin[i]) if i is not None else None
        if file is None:
            file = self.files.get(name)
            if file is None:
                raise LayerpruneError(
                    f"{name} is not in the checkpoint of {self.folder} (its tensor names differ from the "
                    "model's); load this model without --max-memory"
                )
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Any tensor of the state dict, as it is now (a changed block's new values), on CPU."""
        if self.block_of(name) is None:
            return self.model.state_dict()[name].detach().cpu()
        return self._read(name).to(self.dtype)

    # ---- residency ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def resident(self, i: int, modifies: bool = False) -> Iterator[None]:
        """Block i on the compute device inside the `with`; with `modifies`, its new values are
        kept (written to the overlay) when it leaves. Nested calls for the same block share one load."""
        from accelerate.utils import set_module_tensor_to_device

        first = self._depth.get(i, 0) == 0
        if first:
            for name in self.block_names(i):
                set_module_tensor_to_device(
                    self.model, name, self.device, value=self._read(name), dtype=self.dtype
                )
            self.loads += 1
        self._depth[i] = self._depth.get(i, 0) + 1
        try:
            yield
            if modifies:
                self._keep(i)
        finally:
            self._depth[i] -= 1
            if self._depth[i] == 0:
                self.adapter.blocks[i].to("meta")
                release_freed_memory()

    def _keep(self, i: int) -> None:
        block, o = self.adapter.blocks[i], self.origin[i]
        state = {f"{self.prefix}.{o}.{n}": t for n, t in block.state_dict().items()}
        path = self._overlay / f"block-{o}-{self._writes}.safetensors"
        self._writes += 1
        shapes = {n: tuple(t.shape) for n, t in state.items()}
        write_safetensors(
            path, list(state), shapes, {n: t.dtype for n, t in state.items()}, state.__getitem__
        )
        old, self._changed[o] = self._changed.get(o), path
        if old is not None:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        self._cleanup()

    # ---- export ------------------------------------------------------------------------------
    def save(self, out: Path, dtype: torch.dtype) -> None:
        """Config and weights into `out`: the input's shard files and index, tensor by tensor."""
        out = Path(out)
        self.model.config.dtype = dtype
        self.model.config.save_pretrained(out)
        if getattr(self.model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):
                self.model.generation_config.save_pretrained(out)
        shapes = {n: tuple(t.shape) for n, t in self.model.state_dict().items()}
        # each tensor goes to the shard file that held it in the input, under its name now (a block
        # after removed ones is renumbered); removed blocks and parts are gone, tied copies not stored
        order = {n: k for k, n in enumerate(self.files)}
        per_file: dict[str, list[str]] = {}
        for name in sorted(shapes, key=lambda n: order.get(self.source(n), len(order))):
            src = self.source(name)
            if src in self.files:
                per_file.setdefault(self.files[src].name, []).append(name)
            elif self.block_of(name) is not None:
                raise LayerpruneError(f"{name} has no tensor in the checkpoint of {self.folder}")
        total = 0
        for file, names in per_file.items():
            total += write_safetensors(out / file, names, shapes, dtype, self.tensor)
        if (self.folder / "model.safetensors.index.json").is_file():
            index = {
                "metadata": {"total_size": total},
                "weight_map": {n: f for f, names in per_file.items() for n in sorted(names)},
            }
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors(path: Path, names: list[str], shapes: dict, dtype, get) -> int:
    """Write a safetensors file one tensor at a time (the format: an 8-byte little-endian header
    length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes in order). Only
    one tensor is in memory at once, and its bytes go to the file without a copy; safetensors' own
    writer holds a bytes copy of every tensor. `dtype`: one torch dtype, or {name: dtype}.
    Returns the data bytes."""
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(names, dtype)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        numel = 1
        for d in shapes[name]:
            numel *= d
        size = numel * torch.empty(0, dtype=dtypes[name]).element_size()
        header[name] = {
            "dtype": _ST_DTYPES[dtypes[name]],
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = get(name).detach().to("cpu", dtypes[name]).contiguous()
            if tuple(t.shape) != tuple(shapes[name]):
                raise LayerpruneError(f"{name} has shape {tuple(t.shape)}, not {shapes[name]}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    return offset


def load_offloaded(source: Path, config, device: str, dtype: torch.dtype, max_memory: int, sizes: dict):
    """(model, adapter, OffloadedBlocks) with blocks on meta; what lies outside them loaded now.
    `sizes`: bytes of each checkpoint tensor in `dtype` (checkpoint_bytes)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from .adapter import ModelAdapter

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    adapter = ModelAdapter(model)
    blocks = OffloadedBlocks(model, adapter, source, device, dtype)
    outside = sum(s for n, s in sizes.items() if blocks.block_of(n) is None)
    per_block = [sum(sizes.get(n, 0) for n in blocks.block_names(i)) for i in range(adapter.num_blocks)]
    need = outside + max(per_block)
    if need > max_memory:
        blocks.close()
        raise LayerpruneError(
            f"--max-memory {human(max_memory)} cannot hold one block ({human(max(per_block))}) plus the "
            f"embeddings and head ({human(outside)}); raise it to at least {human(need)}"
        )
    for name, file in blocks.files.items():
        if blocks.block_of(name) is None:
            with safe_open(str(file), framework="pt") as f:
                set_module_tensor_to_device(model, name, device, value=f.get_tensor(name), dtype=dtype)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and blocks.block_of(n) is None]
    if left:
        blocks.close()
        raise LayerpruneError(f"{source} lacks {left[0]}; load this model without --max-memory")
    for name, buf in model.named_buffers():  # rotary tables and the like: built, not stored
        if blocks.block_of(name) is None and buf.device.type != torch.device(device).type:
            set_module_tensor_to_device(model, name, device, value=buf)
    adapter.offload = blocks
    return model, adapter, blocks
