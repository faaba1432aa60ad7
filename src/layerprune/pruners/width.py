"""Width pruning: apply a width plan, and FLAP's bias compensation.

`apply_plan` scores KV groups and MLP channels with the plan's pruner (`wanda-sp`, `magnitude-sp`,
`flap`: scorers/structured.py, scorers/flap.py), keeps the highest-scoring units at the counts the
plan's rates give (`models/width_decisions.py`), and removes the others for good (`models/shrink.py`). With
FLAP scores, the removed features' mean contribution is first added to the o / down biases
(`compensation`, `add_output_biases`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LayerpruneError
from ..models.adapter import ModelAdapter
from ..models.decilm import check_deployable, to_decilm
from ..models.shrink import ensure_bias, shrink, sync_config
from ..models.width import WidthMask, check_masks, layout, removed
from ..models.width_decisions import budgets, decision_of, masks_for
from ..plans import WidthPlan
from ..registry import PARTS
from ..scorers.run import run


def compensation(adapter: ModelAdapter, masks: Sequence[WidthMask], means: dict) -> list[dict]:
    """Per block, {part: W[:, removed] @ mean[removed]} for the o / down projection (float64): what
    the removed input features contributed on average over the calibration tokens. `means`: per
    part and block, the mean of every input feature of the projection (FLAP scores' extra)."""
    masks = check_masks(adapter, masks)
    out = []
    for i, m in enumerate(masks):
        deltas = {}
        with adapter.resident(i):
            for part, keep in zip(PARTS, (m.groups, m.channels)):
                role = adapter.spec.output_roles[part]
                _, idx = layout(adapter, i, part)[role]
                gone = removed(keep, idx.shape[0])
                if not gone:
                    continue
                cols = idx[gone].reshape(-1)
                w = adapter.weight(adapter.linears(i)[role]).detach()
                mean = torch.as_tensor(means[part][i], dtype=torch.float64, device=w.device)
                if mean.shape[0] != w.shape[1]:
                    raise LayerpruneError(
                        f"block {i}: {mean.shape[0]} {part} feature means for {w.shape[1]} features; "
                        "re-score the model with --method flap"
                    )
                deltas[part] = w[:, cols].double() @ mean[cols.to(w.device)]
        out.append(deltas)
    return out


@torch.no_grad()
def add_output_biases(adapter: ModelAdapter, deltas: Sequence[dict]) -> None:
    """Add `deltas` (per block, {part: vector}) to the biases of the o / down projections, creating
    them where missing. Where the config has a flag for the part's biases (Llama's attention_bias,
    mlp_bias) it is set and every projection of the part in every block gets a (zero) bias, so a
    standard checkpoint still loads with plain transformers; elsewhere the new bias is marked and
    the block's shape lists it (`output_bias`), for `load_shrunk`."""
    adapter.require_in_memory("FLAP's bias compensation")
    keys = adapter.spec.bias_config_keys
    L = adapter.num_blocks
    for part in PARTS:
        if not any(part in d for d in deltas):
            continue
        role = adapter.spec.output_roles[part]
        missing = any(getattr(adapter.linears(i)[role], "bias", None) is None for i in range(L))
        if missing and part in keys:
            setattr(adapter.config, keys[part], True)
            for i in range(L):
                linears = adapter.linears(i)
                for r in layout(adapter, i, part):
                    ensure_bias(adapter, linears[r], mark=False)
        for i, d in enumerate(deltas):
            if part not in d:
                continue
            layer = adapter.linears(i)[role]
            ensure_bias(adapter, layer, mark=True)
            layer.bias.add_(d[part].to(layer.bias.device, layer.bias.dtype))


def _apply_deployable(lm, plan, masks: list[WidthMask], before: int) -> dict:
    """A deployable plan: narrow the MLPs, then remove whole parts and blocks (models/decilm.py)."""
    check_deployable(lm.adapter, plan.channel_multiple)
    if plan.pruner == "flap":
        raise LayerpruneError(
            "FLAP's bias compensation has no place in a DeciLM model; use --pruner wanda-sp"
        )
    removed = {}
    for i, m in enumerate(masks):
        parts = {p for p, keep in zip(PARTS, (m.groups, m.channels)) if keep == []}
        if parts:
            removed[i] = parts
    narrowed = [WidthMask(None, None if m.channels == [] else m.channels) for m in masks]
    blocks = shrink(lm, narrowed)
    deleted = to_decilm(lm.adapter, removed)
    lm.modified()
    after = sum(p.numel() for p in lm.model.parameters())
    return {
        "pruner": plan.pruner,
        "bias_compensation": False,
        "format": "decilm",
        "parameters_before": before,
        "parameters_after": after,
        "removed_fraction_of_model": 1 - after / before,
        "standard_config": False,
        "removed_parts": [f"{i}.{p}" for i, ps in sorted(removed.items()) for p in sorted(ps)],
        "deleted_blocks": deleted,
        "blocks": blocks,
    }


@torch.no_grad()
def apply_plan(lm, plan, windows, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Apply a width plan to the loaded model: score groups and channels with the plan's pruner on
    `windows` (none for magnitude-sp), remove the lowest ones physically; with FLAP scores, add the
    removed features' mean contribution to the o / down biases first. Returns the report."""
    if not isinstance(plan, WidthPlan):
        raise LayerpruneError(f"this is a {plan.kind} plan, not a width plan; apply it with layerprune.apply")
    plan.check(lm)
    before = sum(p.numel() for p in lm.model.parameters())
    scores = run(lm, plan.pruner, windows, batch_size=batch_size, progress=progress)
    decision = decision_of(plan, budgets(lm.adapter))
    masks = masks_for(decision, scores.extra)
    if plan.deploy:
        return _apply_deployable(lm, plan, masks, before)
    compensate = plan.pruner == "flap"
    if compensate:
        lm.adapter.require_in_memory("FLAP's bias compensation")
        add_output_biases(lm.adapter, compensation(lm.adapter, masks, scores.extra["means"]))
    blocks = shrink(lm, masks)
    after = sum(p.numel() for p in lm.model.parameters())
    return {
        "pruner": plan.pruner,
        "bias_compensation": compensate,
        "parameters_before": before,
        "parameters_after": after,
        "removed_fraction_of_model": 1 - after / before,
        "standard_config": sync_config(lm.adapter),
        "blocks": blocks,
    }
