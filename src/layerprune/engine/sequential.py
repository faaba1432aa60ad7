"""Block-by-block calibration: the sequential procedure of Wanda and SparseGPT, written once.

    capture the inputs of block 0 on the calibration windows
    for each block i:
        run block i (as it is) on every micro-batch, with hooks feeding its linear layers' inputs to
            per-layer statistics (column norms for Wanda, the Hessian for SparseGPT, outlier counts)
        let the method act on block i (prune it, or just record something)
        run block i again (now pruned) and keep its outputs as the inputs of block i+1

Only one block's statistics and one set of calibration activations are alive at a time: outputs
replace inputs micro-batch by micro-batch. The activations live in memory (on a GPU while they fit,
else on CPU) or, with `offload="disk"`, as safetensors files in a temporary folder, so that peak memory
is the model plus one micro-batch however many calibration tokens are used.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerpruneError
from ..io import scratch_dir
from ..models.adapter import ModelAdapter
from .masked import BlockRunner

# True while run_sequential walks this rank's share of the calibration windows under torchrun: the
# statistics below are then summed over the ranks when they are read.
_SPLIT = contextvars.ContextVar("layerprune_split_calibration", default=False)


def _fits_on_gpu(h: torch.Tensor) -> bool:
    if not h.is_cuda:
        return False
    free, _ = torch.cuda.mem_get_info(h.device)
    return h.numel() * h.element_size() * 4 < free


class ActivationStore:
    """Hidden states of the calibration windows, one tensor per micro-batch.

    On disk each put writes a new safetensors file (shape and dtype travel in its header) and
    deletes the micro-batch's previous one. A tensor returned by `get` on the CPU is memory-mapped
    from its file, so a file is never written twice: a save that truncates the file in place (as
    some safetensors releases do) would pull the pages from under a tensor still alive (a block
    that returns its input unchanged, say). The folder is removed by `close` (also on leaving a
    `with` block, exceptions included)."""

    def __init__(self, offload: str = "memory"):
        if offload not in ("memory", "disk"):
            raise ValueError(f"offload must be memory or disk, not {offload}")
        self.offload = offload
        self._mem: dict[int, torch.Tensor] = {}
        self._files: dict[int, Path] = {}
        self._writes = 0
        self._dir = scratch_dir("acts") if offload == "disk" else None
        # removed by close(), or at the latest when the interpreter exits (interrupted before `with`)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True) if self._dir else None

    def put(self, b: int, h: torch.Tensor) -> None:
        if self._dir is None:
            # On a GPU the activations stay there while they fit (a quarter of what is free is
            # left for the block's own work), otherwise they wait on the CPU; on CPU this is the
            # tensor itself.
            self._mem[b] = h.detach() if _fits_on_gpu(h) else h.detach().to("cpu")
            return
        path = self._dir / f"{b}-{self._writes}.safetensors"
        self._writes += 1
        save_file({"h": h.detach().to("cpu").contiguous()}, str(path))
        old, self._files[b] = self._files.get(b), path
        if old is not None:
            with contextlib.suppress(OSError):  # where a mapped file cannot go yet, close() takes it
                old.unlink()

    def get(self, b: int, device) -> torch.Tensor:
        if self._dir is None:
            return self._mem[b].to(device)
        with safe_open(str(self._files[b]), framework="pt") as f:
            return f.get_tensor("h").to(device)

    def close(self) -> None:
        self._mem.clear()
        self._files.clear()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Enough(Exception):
    """Raised inside a calibration forward once every linear layer of the block has its input."""


class LayerInputs:
    """Forward pre-hooks that hand every linear layer's input (rows = tokens) to a callback.

    Inside `batch()`, the forward stops as soon as every hooked layer has had its input: the block's
    output of a calibration pass is never used, so the last layer's matmul (the MLP's down
    projection in a Llama block: a quarter of the block's linear work) and what follows it are not
    computed. A layer called again after that point would be missed, so a block whose layers do not
    all run in a batch (an MoE with experts no token chose) simply runs to its end."""

    def __init__(self, layers: dict[str, nn.Module], callback: Callable[[str, torch.Tensor], None]):
        self.expected = len(layers)
        self.seen: set[str] | None = None
        self.handles = [
            layer.register_forward_pre_hook(lambda _m, args, name=name: self._hook(name, args[0]))
            for name, layer in layers.items()
        ]
        self.callback = callback

    def _hook(self, name: str, x: torch.Tensor) -> None:
        self.callback(name, x.detach())
        if self.seen is not None:
            self.seen.add(name)
            if len(self.seen) == self.expected:
                raise _Enough

    @contextlib.contextmanager
    def batch(self):
        """One calibration forward, cut short once every layer has its input."""
        self.seen = set()
        try:
            yield
        except _Enough:
            pass
        finally:
            self.seen = None

    def __enter__(self) -> LayerInputs:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    on_block: Callable[[int, Callable[[Callable[[str, torch.Tensor], None]], None]], None],
    *,
    batch_size: int = 8,
    offload: str = "memory",
    progress: bool = True,
    desc: str = "blocks",
    modifies: bool = True,
    split_data: bool = False,
) -> None:
    """Walk the blocks in order. `on_block(i, calibrate)` may call `calibrate(callback)` any number of
    times: each call runs block i on every micro-batch with `callback(role, inputs)` hooked on its
    linear layers. Whatever it did to the block, the block's outputs are then recomputed (but for
    the last block's, which feed nothing).
    With offloaded blocks, block i is resident while it is calibrated, changed and recomputed, and
    (`modifies`) its new weights are kept as it leaves.
    `split_data` under torchrun: each rank walks its contiguous share of the windows, and the
    statistics (ColumnNorms, Hessian) are all-reduced at each block boundary, when read."""
    from ..distributed import group

    g = group()
    if split_data and g.active:
        if input_ids.shape[0] < g.world:
            raise LayerpruneError(
                f"{input_ids.shape[0]} calibration windows cannot be split over {g.world} ranks; "
                "use more --samples or fewer processes"
            )
        lo, hi = g.share(input_ids.shape[0])
        input_ids = input_ids[lo:hi]
    token = _SPLIT.set(split_data and g.active)
    try:
        _walk(model, adapter, input_ids, on_block, batch_size, offload, progress, desc, modifies)
    finally:
        _SPLIT.reset(token)


def _walk(model, adapter, input_ids, on_block, batch_size, offload, progress, desc, modifies) -> None:
    runner = BlockRunner(model, adapter, input_ids, batch_size)
    device = runner.device
    with ActivationStore(offload) as store:
        for b in range(len(runner.batches)):
            store.put(b, runner.embed_batch(b))
        for i in tqdm(range(adapter.num_blocks), desc=desc, disable=not progress, leave=False):

            def calibrate(callback, i=i):
                with LayerInputs(adapter.linears(i), callback) as inputs:
                    for b in range(len(runner.batches)):
                        with inputs.batch():
                            runner.block_batch(i, b, store.get(b, device))

            with adapter.resident(i, modifies=modifies):
                on_block(i, calibrate)
                if i == adapter.num_blocks - 1:  # the last block's outputs feed nothing
                    break
                for b in range(len(runner.batches)):
                    store.put(b, runner.block_batch(i, b, store.get(b, device)))


class ColumnNorms:
    """Sum over calibration tokens of x_j^2 for every input column j (Wanda's ||X_j||^2)."""

    def __init__(self):
        self.sq: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.pow(2).sum(0)
        self.sq = s if self.sq is None else self.sq + s
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        if _SPLIT.get() and not getattr(self, "_reduced", False):
            self.sq, self.tokens = _over_ranks(self.sq, self.tokens)
            self._reduced = True
        return self.sq.sqrt()


class Hessian:
    """H = (2 / tokens) * sum X X^T over calibration tokens (SparseGPT's layer Hessian), float32."""

    def __init__(self):
        self.H: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.H is None:
            self.H = x.T @ x
        else:
            self.H.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if _SPLIT.get() and not getattr(self, "_reduced", False):
            self.H, self.tokens = _over_ranks(self.H, self.tokens)
            self._reduced = True
        return self.H * (2.0 / self.tokens)


class SharedStats:
    """The statistics of a block's layers, one per distinct input: layers handed the very same tensor
    in a forward (q, k and v read one normed hidden state; gate and up another) share one
    ColumnNorms or Hessian, accumulated once. A calibration callback: `calibrate(stats)`, then
    `stats[role]`. Layers that share a statistic are grouped by identity of the tensor (same storage,
    offset, shape, strides and version, while the previous one is held so its memory cannot be
    reused by another tensor), and must be grouped alike in every batch."""

    def __init__(self, roles, make: Callable[[], object]):
        self.make = make
        self.roles = set(roles)
        self.stats: dict[str, object] = {}
        self.leader: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor, tuple] | None = None

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        # the version as it is now: a held tensor's counter moves with later in-place changes
        return (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x._version)

    def __call__(self, role: str, x: torch.Tensor) -> None:
        if role not in self.roles:
            return
        last, key = self._last, self._key(x)
        leader = self.leader.get(last[0], last[0]) if last is not None and last[2] == key else role
        self._last = (role, x, key)
        if self.leader.setdefault(role, leader) != leader:
            raise RuntimeError(f"layer {role} shares its input differently between calibration batches")
        if leader == role:
            if role not in self.stats:
                self.stats[role] = self.make()
            self.stats[role].add(x)

    def __getitem__(self, role: str):
        self._last = None
        return self.stats[self.leader[role]]

    def groups(self) -> list[list[str]]:
        """The roles that share a statistic, leader first."""
        out: dict[str, list[str]] = {}
        for role, leader in self.leader.items():
            out.setdefault(leader, []).append(role)
        return list(out.values())


def _over_ranks(total: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """A statistic and its token count summed over the ranks that split the calibration windows."""
    from ..distributed import all_reduce_sum

    count = torch.tensor([tokens], dtype=torch.float64, device=total.device)
    return all_reduce_sum(total.contiguous()), int(all_reduce_sum(count)[0])
