"""Width decisions: how many KV groups and MLP channels a rate removes in each block, and which.

A width plan speaks in rates (the fraction of a block's prunable parameters removed); the layout of
`models/width.py` says what each unit owns. Between the two:

- accounting: `budgets` (per block, its units and the parameters each owns), `counts` (rates to
  units removed), `achieved` (back to rates), `decision_of` (a plan's units);
- the deployable rule (`Deployable`, `--deploy decilm`): the decisions a per-block serving format
  can carry, a rate moved to the nearest one and the blocks to the target;
- `masks_for`: a decision and structured scores to the `WidthMask`s that keep the best-scored units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import LayerpruneError
from ..registry import PARTS
from .width import WidthMask, layout


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
