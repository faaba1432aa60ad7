"""Width units: which rows and columns of which weights a KV group or an MLP channel owns.

The prunable units of a block are, for its attention, the KV groups (a KV head with the query heads
that read it; one head per group without GQA) and, for its MLP, the intermediate channels.
`layout` says, per architecture (through the adapter's spec), which rows / columns each unit owns;
on it rest the parameter accounting of width plans (`budgets`, `counts`), the masks (`masks_for`,
`check_masks`), and

- `masked(adapter, masks)`: a context in which removed units are silenced without copying any
  weight: forward pre-hooks on the output projections (o, down) zero the input features that the
  removed units produce. Removing the query heads of a group leaves its KV head unread, so this is
  exactly the function of the pruned model.

Removing them for good is `models/shrink.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerpruneError
from ..registry import PARTS
from .adapter import ModelAdapter


@dataclass(frozen=True)
class WidthMask:
    """The units a block keeps: indices of KV groups and of MLP channels (None keeps all)."""

    groups: list[int] | None = None
    channels: list[int] | None = None


def as_adapter(target) -> ModelAdapter:
    """The adapter of a LoadedModel, a ModelAdapter, or a model."""
    if isinstance(target, ModelAdapter):
        return target
    adapter = getattr(target, "adapter", None)
    if isinstance(adapter, ModelAdapter):
        return adapter
    if isinstance(target, nn.Module):
        return ModelAdapter(target)
    raise LayerpruneError(f"expected a loaded model, a ModelAdapter or a model, not {type(target).__name__}")


# ---- layout --------------------------------------------------------------------------------------
def _ranges(n_units: int, size: int, offset: int = 0, stride: int | None = None) -> torch.Tensor:
    """[n_units, size]: unit u owns offset + u * stride + 0..size-1."""
    stride = size if stride is None else stride
    return offset + torch.arange(n_units).unsqueeze(1) * stride + torch.arange(size).unsqueeze(0)


def layout(adapter: ModelAdapter, i: int, part: str) -> dict[str, tuple[int, torch.Tensor]]:
    """What each unit of block i's part owns: role -> (axis, idx), idx a LongTensor [n_units, k].

    axis 0 = rows of the (out, in) weight view (and the bias), 1 = columns. Attention units are the
    KV groups (unit u: query heads u*g .. u*g+g-1, g = heads // kv_heads, and KV head u, as
    transformers' repeat_kv pairs them); MLP units are the intermediate channels."""
    adapter.require_split()
    if part not in PARTS:
        raise LayerpruneError(f"unknown part '{part}'; use attn or mlp")
    roles = adapter.spec.linears
    if part == "mlp":
        n = adapter.mlp_channels(i)
        lay = {}
        for role in ("gate", "up"):
            if role in roles:
                lay[role] = (0, _ranges(n, 1))
        if "gate_up" in roles:  # rows [gate; up]
            lay["gate_up"] = (0, torch.cat([_ranges(n, 1), _ranges(n, 1, offset=n)], dim=1))
        lay[adapter.spec.output_roles["mlp"]] = (1, _ranges(n, 1))
        return lay
    heads, kv = adapter.attn_heads(i)
    d = adapter.head_dim
    if kv < 1 or heads % kv:
        raise LayerpruneError(f"block {i} has {heads} query heads and {kv} KV heads: not whole KV groups")
    g = heads // kv
    q = _ranges(kv, g * d)  # the group's query heads are contiguous
    k = _ranges(kv, d)
    style = adapter.spec.qkv_layout
    if style == "separate":
        lay = {"q": (0, q), "k": (0, k), "v": (0, k.clone())}
    elif style == "concat":  # [q heads; k heads; v heads]
        lay = {"qkv": (0, torch.cat([q, k + heads * d, k + (heads + kv) * d], dim=1))}
    elif style == "interleaved":  # per head [q; k; v]; no GQA
        lay = {"qkv": (0, _ranges(kv, 3 * d * g))}
    else:
        raise LayerpruneError(f"unknown qkv layout '{style}' for {adapter.spec.name}")
    lay[adapter.spec.output_roles["attn"]] = (1, q.clone())
    return lay


def units(adapter: ModelAdapter, i: int) -> tuple[int, int]:
    """(KV groups, MLP channels) of block i."""
    return adapter.width_units(i)


# ---- accounting: what a rate removes -------------------------------------------------------------
@dataclass(frozen=True)
class BlockBudget:
    groups: int  # KV groups
    group_params: int  # parameters one group owns (weights and biases of q, k, v, o slices)
    channels: int  # MLP channels
    channel_params: int

    @property
    def params(self) -> int:
        return self.groups * self.group_params + self.channels * self.channel_params


def budgets(adapter) -> list[BlockBudget]:
    """Per block, how many groups and channels it has and what each owns, from the layout."""
    out = []
    for i in range(adapter.num_blocks):
        sizes = []
        linears = adapter.linears(i)
        for part in PARTS:
            lay = layout(adapter, i, part)
            units = next(iter(lay.values()))[1].shape[0]
            per_unit = 0
            for role, (axis, idx) in lay.items():
                w = adapter.weight(linears[role])
                per_unit += idx.shape[1] * w.shape[1 - axis]
                bias = getattr(linears[role], "bias", None)
                if bias is not None and axis == 0:
                    per_unit += idx.shape[1]
            sizes += [units, per_unit]
        out.append(BlockBudget(*sizes))
    return out


def counts(rates: list[float], blocks: list[BlockBudget]) -> list[tuple[int, int]]:
    """(groups removed, channels removed) per block for the given rates."""
    if len(rates) != len(blocks):
        raise LayerpruneError(f"{len(rates)} rates for {len(blocks)} blocks; give one rate per block")
    out = []
    for r, b in zip(rates, blocks):
        g = min(max(round(r * b.groups), 0), b.groups - 1)
        rest = r * b.params - g * b.group_params
        c = min(max(round(rest / b.channel_params), 0), b.channels - 1)
        out.append((g, c))
    return out


def achieved(decision: list[tuple[int, int]], blocks: list[BlockBudget]) -> list[float]:
    return [(g * b.group_params + c * b.channel_params) / b.params for (g, c), b in zip(decision, blocks)]


# ---- deployable decisions (--deploy decilm) ---------------------------------------------------------
# A deployable plan may miss its target by at most this fraction of the blocks' prunable parameters.
DEPLOY_TOLERANCE = 0.005


@dataclass(frozen=True)
class Deployable:
    """What a per-block serving format can carry (DeciLM / Nemotron-NAS: `models/decilm.py`).

    Per block: attention kept whole or removed whole (never in block 0: the first block's attention
    is what fills the residual stream), query heads unchanged; MLP channels kept in multiples of
    `channel_multiple`, or the whole MLP removed together with the attention (the block is then
    deleted). An MLP removed under a kept attention is not offered: llama.cpp's `deci` runtime
    then drops the attention's output too (src/models/deci.cpp: a block with n_ff == 0 `continue`s
    before the residual add).

    A rate becomes the option whose removed parameters are nearest to it, counted in MLP steps
    (`channel_multiple` channels); among options equally near, the one whose removed units the
    structured scores rate lowest (a whole attention against MLP channels of the same cost); then,
    when a target is given, blocks move one option at a time, those furthest below (above) their
    own rate first (then the one whose scores change least), while that brings the total nearer
    the target."""

    channel_multiple: int = 256

    def options(self, i: int, b: BlockBudget) -> list[tuple[int, int]]:
        """(groups removed, channels removed) that block i may take, by removed parameters."""
        m = self.channel_multiple
        if b.channels % m:
            raise LayerpruneError(
                f"block {i} has {b.channels} MLP channels, not a multiple of --channel-multiple {m}; "
                "a deployable plan cannot state its width (use a divisor of it that is a multiple of 256)"
            )
        kept = range(b.channels, 0, -m)
        out = [(0, b.channels - k) for k in kept]
        if i > 0:
            out += [(b.groups, b.channels - k) for k in kept] + [(b.groups, b.channels)]
        cost = lambda o: o[0] * b.group_params + o[1] * b.channel_params  # noqa: E731
        return sorted(out, key=lambda o: (cost(o), o))

    def _menu(self, i: int, b: BlockBudget, table: dict | None, at: int) -> list[tuple]:
        """(removed parameters, lost score, option) for every option of block i; the scores are those
        of block `at` of `table` (none: 0)."""
        lost = _removed_scores(table, at, b) if table is not None else (lambda o: 0.0)
        return [(o[0] * b.group_params + o[1] * b.channel_params, lost(o), o) for o in self.options(i, b)]

    def decision(
        self,
        rates: list[float],
        blocks: list[BlockBudget],
        table: dict | None = None,
        target: float | None = None,
        position: bool = False,
        first: int = 0,
    ) -> list[tuple[int, int]]:
        """(groups removed, channels removed) per block: every one an option of `options`.

        `position` (the search's genome): the rate picks the nearest cost, and where several options
        cost the same (a whole attention against as many parameters of MLP channels), where the rate
        lies within half a step of that cost picks among them, lowest-scoring first: every option
        stays reachable by moving a rate, as a per-block choice in Puzzle's search is."""
        if len(rates) != len(blocks):
            raise LayerpruneError(f"{len(rates)} rates for {len(blocks)} blocks; give one rate per block")
        menus, chosen = [], []  # per block: [(cost, lost score, option)], and the chosen one
        for i, (r, b) in enumerate(zip(rates, blocks)):
            menu = self._menu(i + first, b, table, i)
            step = self.channel_multiple * b.channel_params
            menus.append(menu)
            if not position:
                chosen.append(
                    min(
                        menu,
                        key=lambda e, r=r, b=b, step=step: (round(abs(e[0] - r * b.params) / step), e[1:]),
                    )
                )
                continue
            level = min({e[0] for e in menu}, key=lambda c, r=r, b=b: (abs(c - r * b.params), c))
            same = sorted((e for e in menu if e[0] == level), key=lambda e: e[1:])
            offset = (r * b.params - level) / step + 0.5  # 0..1 within the step around the level
            chosen.append(same[min(max(int(offset * len(same)), 0), len(same) - 1)])
        if target is not None:
            goal = target * sum(b.params for b in blocks)
            total = sum(e[0] for e in chosen)
            while True:
                up = total < goal
                moves = []
                for i, e in enumerate(chosen):
                    further = [f for f in menus[i] if (f[0] > e[0] if up else f[0] < e[0])]
                    if not further:
                        continue
                    edge = min(f[0] for f in further) if up else max(f[0] for f in further)
                    nxt = min((f for f in further if f[0] == edge), key=lambda f: f[1:])
                    new = total - e[0] + nxt[0]
                    if abs(new - goal) < abs(total - goal):
                        behind = rates[i] * blocks[i].params - e[0]  # > 0: below its own rate
                        # furthest from its own rate first; then the cheapest in scores (then block order)
                        moves.append((-behind if up else behind, abs(nxt[1] - e[1]), i, nxt, new))
                if not moves:
                    break
                *_, i, nxt, total = min(moves, key=lambda m: m[:3])
                chosen[i] = nxt
        return [e[2] for e in chosen]

    def encode(self, decision, blocks: list[BlockBudget], table: dict | None = None) -> list[float]:
        """Rates that `decision(..., position=True)` turns back into `decision` (without a target):
        each block's rate at the middle of its option's share of the step, so that a deployable
        search starts from the allocations' deployable decisions themselves."""
        rates = []
        for i, (o, b) in enumerate(zip(decision, blocks)):
            cost = o[0] * b.group_params + o[1] * b.channel_params
            menu = self._menu(i, b, table, i)
            same = sorted((e for e in menu if e[0] == cost), key=lambda e: e[1:])
            j = [e[2] for e in same].index(tuple(o))
            step = self.channel_multiple * b.channel_params
            rate = (cost + ((j + 0.5) / len(same) - 0.5) * step) / b.params
            if self.decision(
                [rate], [b], None if table is None else _one(table, i), position=True, first=i
            ) != [tuple(o)]:
                rate = cost / b.params  # levels nearer than half a step: the level itself
            rates.append(rate)
        return rates

    def check_shapes(self, target: float, blocks: list[BlockBudget]) -> None:
        """What the shapes alone refuse, before any scoring (scores only break ties between options):
        MLP widths that are not multiples of `channel_multiple`, and a target that even the smallest
        removal overshoots while removing nothing falls short of it."""
        if target > DEPLOY_TOLERANCE and self._least(blocks) - target > DEPLOY_TOLERANCE:
            self.check_target(target, blocks, [(0, 0)] * len(blocks))

    def _least(self, blocks: list[BlockBudget]) -> float:
        """The least fraction of the blocks' parameters a decision can remove but none (inf: none can)."""
        costs = [
            o[0] * b.group_params + o[1] * b.channel_params
            for i, b in enumerate(blocks)
            for o in self.options(i, b)
            if o != (0, 0)
        ]
        return min(costs, default=math.inf) / sum(b.params for b in blocks)

    def check_target(self, target: float, blocks: list[BlockBudget], decision) -> None:
        """One line naming targets that can be met, when the decision misses `target`."""
        total = sum(b.params for b in blocks)
        got = sum(g * b.group_params + c * b.channel_params for (g, c), b in zip(decision, blocks)) / total
        if abs(got - target) <= DEPLOY_TOLERANCE:
            return
        steps = sorted({round(self.channel_multiple * b.channel_params / total, 4) for b in blocks})
        if round(got, 4) <= 0 and self._least(blocks) < 1:  # nothing removed: the least that removes some
            got = math.ceil(self._least(blocks) * 1e4) / 1e4
        raise LayerpruneError(
            f"--width {target} cannot be met with MLP widths in multiples of {self.channel_multiple} "
            f"(the nearest deployable target is {got:.4f}; steps of {steps[0]:.4f}); use --width {got:.4f}"
            + (" or a smaller --channel-multiple" if self.channel_multiple > 256 else "")
        )


def _one(table: dict, i: int) -> dict:
    """The score table of block i alone."""
    return {"groups": [table["groups"][i]], "channels": [table["channels"][i]]}


def _removed_scores(table: dict, i: int, b: BlockBudget):
    """Summed structured scores of what an option of block i removes: its g lowest groups and c
    lowest channels."""
    gs = sorted(table["groups"][i])
    cs = sorted(table["channels"][i])
    pre_g = [0.0]
    for v in gs:
        pre_g.append(pre_g[-1] + v)
    pre_c = [0.0]
    for v in cs:
        pre_c.append(pre_c[-1] + v)
    return lambda o: pre_g[o[0]] + pre_c[o[1]]


def decision_of(plan, blocks: list[BlockBudget]) -> list[tuple[int, int]]:
    """The groups and channels a width plan removes, block by block (its rates times the sizes)."""
    return [(round(a * b.groups), round(m * b.channels)) for a, m, b in zip(plan.attn, plan.mlp, blocks)]


def masks_for(decision: list[tuple[int, int]], table: dict):
    """Keep all but the g lowest-scoring groups and the c lowest-scoring channels of each block.

    `table`: {"groups": [...], "channels": [...]} per block, e.g. the `extra` of structured scores.
    A decision removing all of a part (deployable plans) gives an empty list: the part is removed."""
    masks = []
    for (g, c), gs, cs in zip(decision, table["groups"], table["channels"]):
        keep_g = sorted(sorted(range(len(gs)), key=lambda j: (gs[j], j))[g:])
        keep_c = sorted(sorted(range(len(cs)), key=lambda j: (cs[j], j))[c:])
        masks.append(WidthMask(groups=keep_g, channels=keep_c))
    return masks


# ---- masks ---------------------------------------------------------------------------------------
def check_masks(
    adapter: ModelAdapter, masks: Sequence[WidthMask], allow_removed: bool = False
) -> list[WidthMask]:
    """The masks with sorted indices; LayerpruneError naming the block and the fix otherwise.

    `allow_removed`: an empty list removes the whole part (deployable plans: `masked` silences it;
    `pruners/width.py` replaces it by a no-op)."""
    adapter.require_split()
    masks = list(masks)
    L = adapter.num_blocks
    if len(masks) != L:
        raise LayerpruneError(f"{len(masks)} width masks for {L} blocks; give one WidthMask per block")
    out = []
    for i, m in enumerate(masks):
        if not isinstance(m, WidthMask):
            raise LayerpruneError(f"width mask {i} is a {type(m).__name__}, not a WidthMask")
        n_groups, n_channels = units(adapter, i)
        kept = []
        for what, keep, n in (("groups", m.groups, n_groups), ("channels", m.channels, n_channels)):
            if keep is None:
                kept.append(None)
                continue
            idx = sorted(int(j) for j in keep)
            if len(set(idx)) != len(idx):
                raise LayerpruneError(f"block {i}: the kept {what} repeat an index; list each once")
            if idx and (idx[0] < 0 or idx[-1] >= n):
                raise LayerpruneError(f"block {i}: kept {what} {idx} out of range: the block has 0..{n - 1}")
            if not idx and not allow_removed:
                unit = "KV group" if what == "groups" else "MLP channel"
                raise LayerpruneError(f"block {i}: the mask removes every {unit}; keep at least one")
            kept.append(idx)
        out.append(WidthMask(*kept))
    return out


def removed(keep: list[int] | None, n: int) -> list[int]:
    return [] if keep is None else sorted(set(range(n)) - set(keep))


def _zero_inputs(idx: torch.Tensor, fill: torch.Tensor | None = None):
    """Zero the input features `idx`, or (fill: a vector over all features, zero elsewhere) set them
    to fill's values."""
    cache: dict[torch.device, torch.Tensor] = {}
    fills: dict[tuple, torch.Tensor] = {}

    def hook(module, args, kwargs):
        if args:
            x = args[0]
        else:  # called with a keyword: the one tensor argument
            key = next(k for k, v in kwargs.items() if torch.is_tensor(v))
            x = kwargs[key]
        where = cache.setdefault(x.device, idx.to(x.device))
        x = x.index_fill(-1, where, 0)
        if fill is not None:
            x = x + fills.setdefault((x.device, x.dtype), fill.to(x.device, x.dtype))
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, key: x}

    return hook


def _zero_output(module, args, output):
    return torch.zeros_like(output)


@contextlib.contextmanager
def masked(adapter: ModelAdapter, masks: Sequence[WidthMask], means: dict | None = None) -> Iterator[None]:
    """Within the context, removed groups and channels contribute nothing. No weight is copied.
    A part whose mask is empty (deployable plans) outputs zeros, its projection's bias included.

    `means` ({"attn": [...], "mlp": [...]}: per block, the calibration mean of every input feature
    of the o / down projection, as FLAP scores record them): removed features read their mean
    instead of zero, which is exactly FLAP's bias compensation (W[:, removed] @ mean[removed])."""
    adapter = as_adapter(adapter)
    masks = check_masks(adapter, masks, allow_removed=True)
    handles = []
    try:
        for i, m in enumerate(masks):
            for part, keep in zip(PARTS, (m.groups, m.channels)):
                lay = layout(adapter, i, part)
                role = adapter.spec.output_roles[part]
                if keep == []:
                    handles.append(adapter.linears(i)[role].register_forward_hook(_zero_output))
                    continue
                axis, idx = lay[role]
                gone = removed(keep, idx.shape[0])
                if not gone:
                    continue
                cols = idx[gone].reshape(-1)
                layer = adapter.linears(i)[role]
                fill = None
                if means is not None:
                    mean = torch.as_tensor(means[part][i], dtype=torch.float64)
                    fill = torch.zeros_like(mean).index_copy(0, cols, mean[cols])
                handles.append(layer.register_forward_pre_hook(_zero_inputs(cols, fill), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
