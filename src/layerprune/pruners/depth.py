"""Apply a depth plan: delete whole blocks; silence attention / MLP parts of the blocks that stay.

Whole blocks are deleted through the adapter (layer_idx re-numbered, config fixed), so the result
is a standard checkpoint. A removed attention or MLP part inside a kept block cannot be expressed in
a standard config: its output projection (role o, or down) is zeroed, weight and bias, which makes
the branch contribute exactly nothing, so plain transformers computes the pruned function; the
config records the removed parts (`layerprune_removed_parts`) and `layerprune.load` replaces them
with no-ops, so that inside layerprune they cost no compute.
"""

from __future__ import annotations

import torch

from ..errors import LayerpruneError
from ..models.adapter import ModelAdapter, Unit
from ..plans import DepthPlan

REMOVED_PARTS_KEY = "layerprune_removed_parts"


def split_units(units: list[Unit]) -> tuple[list[int], list[Unit]]:
    """Blocks to delete (whole, or both parts removed) and parts to silence in the kept blocks."""
    parts: dict[int, set[str]] = {}
    blocks = set()
    for u in units:
        if u.part == "block":
            blocks.add(u.block)
        else:
            parts.setdefault(u.block, set()).add(u.part)
    blocks |= {b for b, p in parts.items() if p == {"attn", "mlp"}}
    silenced = [Unit(b, p) for b, ps in sorted(parts.items()) if b not in blocks for p in sorted(ps)]
    return sorted(blocks), silenced


@torch.no_grad()
def apply(lm, plan: DepthPlan) -> dict:
    """Prune the loaded model in place; return counts for the report."""
    if not isinstance(plan, DepthPlan):
        raise LayerpruneError(f"this is a {plan.kind} plan, not a depth plan; apply it with layerprune.apply")
    plan.check(lm)
    adapter: ModelAdapter = lm.adapter
    before = sum(p.numel() for p in lm.model.parameters())
    blocks, parts = split_units(plan.units())
    for u in parts:
        with adapter.resident(u.block, modifies=True):
            layer = adapter.output_linear(u.block, u.part)
            layer.weight.zero_()
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
    if blocks:
        adapter.remove_blocks(blocks)
    renumbered = [str(Unit(u.block - sum(b < u.block for b in blocks), u.part)) for u in parts]
    if renumbered:  # zeroed weights stay in the model, so that the checkpoint is complete
        setattr(lm.model.config, REMOVED_PARTS_KEY, renumbered)
    after = sum(p.numel() for p in lm.model.parameters())
    lm.modified()
    return {
        "removed_blocks": blocks,
        "silenced_parts": [str(u) for u in parts],
        "parameters_before": before,
        "parameters_after": after,
        "blocks_before": plan.model["num_blocks"],
        "blocks_after": adapter.num_blocks,
    }
