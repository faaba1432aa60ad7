"""Structured importance of attention KV groups and MLP channels (the base pruners of width plans).

- `wanda-sp` (the base pruner of Self-Pruner): the Wanda score |W_rj| * ||X_j||_2 (X_j: input feature
  j of the layer over all calibration tokens) summed over every weight a unit owns: the output rows
  of q, k, v (gate, up) that compute the group's heads (the channel) and the input columns of o
  (down) that read them. `owned="output"` keeps only the o / down columns, as FLAP's Wanda-sp
  baseline does (mean over rows there; a sum here, which ranks the same within a layer).
- `magnitude-sp`: the same sums of |W|, no data.

A KV group is one key/value head with the query heads that share it (GQA), so that the head size
and the grouping never change; models without GQA have one head per group. Scores come from the
dense model's calibration activations, block by block, once: any rate vector is then turned into
a structured mask without another pass over the data.

Importance per unit ("3.attn", "3.mlp") is the sum over its groups or channels; the per-group and
per-channel scores are in `extra["groups"]` and `extra["channels"]` (one list per block).
"""

from __future__ import annotations

import torch

from ..engine.sequential import ColumnNorms, SharedStats, run_sequential
from ..errors import LayerpruneError
from ..models.width import layout
from .base import MethodScores

PARTS = ("attn", "mlp")


def unit_scores(
    weight: torch.Tensor, norms: torch.Tensor | None, axis: int, idx: torch.Tensor
) -> torch.Tensor:
    """Sum of |W| (times the input norms, when given) over the slices each unit owns.

    weight: (out, in); axis 0: idx lists rows, 1: columns; idx: [units, k]. Returns [units]."""
    s = weight.detach().abs().float()
    if norms is not None:
        s = s * norms.float()[None, :]
    per_index = s.sum(dim=1 - axis)  # rows: summed over inputs; columns: summed over outputs
    return per_index[idx].sum(dim=1)


def structured_scores(model, adapter, windows, *, data: bool, owned: str, batch_size: int, progress: bool):
    """{"groups": [[...] per block], "channels": [[...] per block]}."""
    if owned not in ("all", "output"):
        raise LayerpruneError(f"unknown owned '{owned}'; use all or output")
    if not adapter.has_parts():
        raise LayerpruneError(
            f"{adapter.spec.name} blocks have no attention / MLP split: width pruning needs one"
        )
    out: dict[str, list[list[float]]] = {"groups": [], "channels": []}

    def block_scores(i: int, stats) -> None:
        linears = adapter.linears(i)
        for part, name in zip(PARTS, ("groups", "channels")):
            total = None
            for role, (axis, idx) in layout(adapter, i, part).items():
                if owned == "output" and axis == 0:
                    continue
                norms = stats[role].norms() if stats is not None else None
                s = unit_scores(adapter.weight(linears[role]), norms, axis, idx)
                total = s if total is None else total + s
            out[name].append(total.tolist())  # one transfer, not one per unit

    if not data:
        for i in range(adapter.num_blocks):
            with adapter.resident(i):
                block_scores(i, None)
        return out

    def on_block(i, calibrate):
        stats = SharedStats(adapter.roles, ColumnNorms)
        calibrate(stats)
        block_scores(i, stats)

    run_sequential(
        model,
        adapter,
        windows.input_ids,
        on_block,
        batch_size=batch_size,
        progress=progress,
        desc="wanda-sp",
        modifies=False,
    )
    return out


def _score(model, adapter, windows, *, data, unit, removed, batch_size, progress, owned) -> MethodScores:
    if unit != "module":
        raise LayerpruneError("structured scores are per attention / MLP part; use --unit module")
    if removed is not None and any(removed):
        raise LayerpruneError("structured scores are computed once on the dense model; drop --iterative")
    table = structured_scores(
        model, adapter, windows, data=data, owned=owned, batch_size=batch_size, progress=progress
    )
    importance = [
        sum(v) for i in range(adapter.num_blocks) for v in (table["groups"][i], table["channels"][i])
    ]
    return MethodScores(importance, {**table, "owned": owned})


def score_wanda_sp(
    model, adapter, windows, *, unit="module", removed=None, batch_size=8, progress=True, owned="all"
):
    return _score(
        model,
        adapter,
        windows,
        data=True,
        unit=unit,
        removed=removed,
        batch_size=batch_size,
        progress=progress,
        owned=owned,
    )


def score_magnitude_sp(
    model, adapter, windows=None, *, unit="module", removed=None, progress=True, owned="all"
):
    return _score(
        model,
        adapter,
        None,
        data=False,
        unit=unit,
        removed=removed,
        batch_size=8,
        progress=progress,
        owned=owned,
    )
