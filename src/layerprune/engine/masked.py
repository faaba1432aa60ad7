"""Loss of a model under many layer masks, on fixed calibration windows, with shared work reused.

`BlockRunner` splits a model's forward pass into three steps that any architecture supports:
- `embed()`: the hidden states entering block 0;
- `block(i, states)`: block i applied to hidden states, called with the exact arguments the
  model's own forward passes it (attention masks, rotary embeddings, per-layer-type variants),
  captured once per batch shape by a forward in which every block is a recorder;
- `nll(states)`: the model's own head on hidden states that leave the last block, reached by a
  forward in which every block is skipped and the last one injects the given states. The final
  norm (and anything else between the blocks and the output embedding) runs as the model runs it;
  the output embedding is then applied in chunks of tokens fused with the log-sum-exp
  (engine/vocab.py), so the [tokens x vocab] logits never exist at once.
Nothing is re-implemented per architecture and no weight is copied.

`evaluate_masks` walks a set of masks as a binary trie over blocks 0..L-1: the hidden states after
a shared prefix of keep/skip decisions are computed once, and a skipped block costs nothing. Single
-block removal (leave-one-out) then costs about L/2 full forwards instead of L; random masks share
their first levels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..distributed import spread
from ..models.adapter import ModelAdapter, SkippedBlock
from .vocab import window_nll

Mask = tuple[bool, ...]


class _Stop(Exception):
    """Raised by the last recorder: the rest of the forward (the LM head) is not needed."""


class _Recorder(nn.Module):
    def __init__(self, calls: dict, index: int, stop: bool = False):
        super().__init__()
        self.calls, self.index, self.stop = calls, index, stop

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (hidden_states, args, kwargs)
        if self.stop:
            raise _Stop
        return hidden_states


class _Inject(nn.Module):
    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, hidden_states, *args, **kwargs):
        return self.states


@contextlib.contextmanager
def _replaced_blocks(adapter: ModelAdapter, stand_ins: Sequence[nn.Module]) -> Iterator[None]:
    blocks = adapter.blocks
    saved = list(blocks)
    try:
        for i, m in enumerate(stand_ins):
            blocks[i] = m
        yield
    finally:
        for i, m in enumerate(saved):
            blocks[i] = m


class BlockRunner:
    """Run a model block by block on fixed windows (split into micro-batches)."""

    def __init__(
        self, model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int = 16
    ):
        self.model, self.adapter = model, adapter
        # the embeddings' device: with offloaded blocks the first parameters may be on meta
        device = self.device = model.get_input_embeddings().weight.device
        self.batches = [b.to(device) for b in input_ids.split(batch_size)]
        self.tokens = int(input_ids.shape[0] * (input_ids.shape[1] - 1))
        self._calls: dict[tuple, dict] = {}
        self.block_calls = 0  # number of (block, micro-batch) forwards run, for benchmarks

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    def _record(self, ids: torch.Tensor, upto: int) -> dict:
        """Forward `ids` with recorders in blocks 0..upto, stopping at block `upto`."""
        calls: dict = {}
        stand_ins = [_Recorder(calls, i, stop=i == upto) for i in range(upto + 1)]
        stand_ins += [SkippedBlock() for _ in range(upto + 1, self.num_blocks)]
        with _replaced_blocks(self.adapter, stand_ins), torch.no_grad(), contextlib.suppress(_Stop):
            self.model(input_ids=ids, use_cache=False)
        return calls

    def _capture(self, ids: torch.Tensor) -> dict:
        # Block arguments (masks, positions, rotary tables) depend on the batch shape only: the
        # windows are unpadded and of equal length.
        key = tuple(ids.shape)
        if key not in self._calls:
            calls = self._record(ids, self.num_blocks - 1)
            self._calls[key] = {i: (args, kwargs) for i, (_, args, kwargs) in calls.items()}
        return self._calls[key]

    @torch.no_grad()
    def embed(self) -> list[torch.Tensor]:
        return [self.embed_batch(b) for b in range(len(self.batches))]

    @torch.no_grad()
    def embed_batch(self, b: int) -> torch.Tensor:
        """The hidden states entering block 0 for micro-batch b."""
        return self._record(self.batches[b], 0)[0][0]

    @torch.no_grad()
    def block_batch(self, i: int, b: int, h: torch.Tensor) -> torch.Tensor:
        """Block i (as it is now) on the hidden states of micro-batch b."""
        args, kwargs = self._capture(self.batches[b])[i]
        self.block_calls += 1
        return self.adapter.blocks[i](h, *args, **kwargs)

    @torch.no_grad()
    def block(self, i: int, states: list[torch.Tensor], parts_off: Sequence[str] = ()) -> list[torch.Tensor]:
        """Block i on every micro-batch; `parts_off` ("attn", "mlp") contribute nothing."""
        out = []
        with (
            self.adapter.resident(i),
            self.adapter.zero_parts(i, parts_off) if parts_off else contextlib.nullcontext(),
        ):
            for b, h in enumerate(states):
                out.append(self.block_batch(i, b, h))
        return out

    @torch.no_grad()
    def nll_per_window(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Summed NLL per window of hidden states leaving the last block (float64, on the CPU)."""
        out = []
        for ids, h in zip(self.batches, states):
            stand_ins = [SkippedBlock() for _ in range(self.num_blocks - 1)] + [_Inject(h)]
            with _replaced_blocks(self.adapter, stand_ins):
                out.append(window_nll(self.adapter, ids))
        return torch.cat(out).cpu()

    def nll(self, states: list[torch.Tensor]) -> float:
        return float(self.nll_per_window(states).sum())


def evaluate_masks(
    runner: BlockRunner,
    masks: Sequence[Sequence[bool | int]],
    granularity: str = "block",
    on_result: Callable[[Mask, float], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """Summed NLL of the calibration windows under each mask (1 = keep), via a trie walk.

    With granularity "block" a mask has one entry per block; with "module" two per block (attention,
    MLP), and a block whose parts are partly kept is run with the others zeroed.
    `on_result(mask, nll)` is called as soon as a mask's value is known (for a persistent store);
    `progress(k)` with the number of masks just finished."""
    L = runner.num_blocks
    per_block = 1 if granularity == "block" else 2
    parts = ("attn", "mlp")
    keyed = [tuple(bool(int(b)) for b in m) for m in masks]
    for m in keyed:
        if len(m) != L * per_block:
            raise ValueError(f"mask of length {len(m)} for {L} blocks at {granularity} granularity")
    unique = sorted(set(keyed), reverse=True)  # keep-branches first: the dense prefix is walked once
    results: dict[Mask, float] = {}

    def state(m: Mask, i: int) -> Mask:
        return m[i * per_block : (i + 1) * per_block]

    def advance(i: int, states: list[torch.Tensor], kept: Mask) -> list[torch.Tensor]:
        if not any(kept):
            return states  # a skipped block costs nothing
        off = [p for p, k in zip(parts, kept) if not k] if per_block == 2 else []
        return runner.block(i, states, off)

    def walk(depth: int, states: list[torch.Tensor], group: list[Mask]) -> None:
        # Follow the decisions that every mask of the group shares without branching.
        while depth < L and all(state(m, depth) == state(group[0], depth) for m in group):
            states = advance(depth, states, state(group[0], depth))
            depth += 1
        if depth == L:
            value = runner.nll(states)
            for m in group:
                results[m] = value
                if on_result is not None:
                    on_result(m, value)
            if progress is not None:
                progress(len(group))
            return
        branches: dict[Mask, list[Mask]] = {}
        for m in group:
            branches.setdefault(state(m, depth), []).append(m)
        for kept, sub in sorted(branches.items(), reverse=True):
            walk(depth + 1, advance(depth, states, kept), sub)

    if unique:
        walk(0, runner.embed(), unique)
    return [results[m] for m in keyed]


class MaskEvaluator:
    """Calibration NLL / perplexity under masks, with a persistent store in front of the trie.

    `evaluations` counts the masks actually run (not found in the store); `distinct_masks` every
    distinct mask asked for, stored or run."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        input_ids: torch.Tensor,
        *,
        granularity: str = "block",
        store=None,
        batch_size: int = 16,
        progress: bool = True,
        allow_empty: bool = False,
    ):
        self.adapter, self.granularity, self.store = adapter, granularity, store
        self.allow_empty = allow_empty  # a game needs v(no block): the embeddings straight into the head
        self.seen: set[Mask] = set()
        self.runner = BlockRunner(model, adapter, input_ids, batch_size)
        self.tokens = self.runner.tokens
        self.num_units = len(adapter.units(granularity))
        self.progress = progress
        self.evaluations = 0

    def _key(self, mask: Mask) -> str:
        from .store import mask_key

        return mask_key(mask, "b" if self.granularity == "block" else "m")

    def nll(self, masks: Sequence[Sequence[bool | int]]) -> list[float]:
        from tqdm.auto import tqdm

        keyed = [self._checked(m) for m in masks]
        self.seen.update(keyed)
        known: dict[Mask, float] = {}
        if self.store is not None:
            stored = self.store.get_many(self._key(m) for m in keyed)
            known = {m: stored[self._key(m)][0] for m in keyed if self._key(m) in stored}
        # Keep-branches first: under torchrun each rank's contiguous share keeps long shared prefixes.
        wanted = sorted(set(keyed), reverse=True)
        bar = tqdm(
            total=len(wanted) - len(known), desc="masks", unit="mask", disable=not self.progress, leave=False
        )

        def record(m: Mask, value: float) -> None:
            self.evaluations += 1
            bar.update()
            if self.store is not None:
                self.store.put(self._key(m), value, self.tokens)

        def evaluate(share: list[Mask], on_value) -> list[float]:
            return evaluate_masks(self.runner, share, self.granularity, on_result=on_value)

        values = spread(wanted, known, evaluate, record)
        bar.close()
        return [values[m] for m in keyed]

    def _checked(self, mask) -> Mask:
        if self.allow_empty and len(mask) == self.num_units and not any(int(b) for b in mask):
            return tuple(False for _ in mask)
        return tuple(self.adapter.check_mask(mask, self.granularity))

    @property
    def distinct_masks(self) -> int:
        return len(self.seen)

    def ppl(self, masks: Sequence[Sequence[bool | int]]) -> list[float]:
        return [perplexity_from_nll(v, self.tokens) for v in self.nll(masks)]


def perplexity_from_nll(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)
