"""SLEB: iterative greedy block removal by calibration loss.

At each step, remove the unit whose removal (given the units already removed) gives the lowest
calibration perplexity. Every candidate set shares its prefix with the others, so the trie engine
and the evaluation store make a step cost far less than one forward per candidate.

Importance = the step at which a unit was removed (1 = first), so that removing the N least
important units reproduces the first N greedy steps; units never removed (protected, or beyond
`steps`) get steps + 1. `extra["order"]` and `extra["ppl_after_step"]` record the path.
"""

from __future__ import annotations

from ..engine.masked import MaskEvaluator
from ..errors import LayerpruneError
from .base import MethodScores, keep_mask, leave_one_out, protected_blocks


def score(
    model,
    adapter,
    windows,
    *,
    unit="block",
    removed=None,
    batch_size=16,
    progress=True,
    store=None,
    protect="default",
    steps=None,
):
    """`protect`: blocks never removed ('ends' by default: SLEB keeps the first and last)."""
    protected = protected_blocks(protect, adapter.num_blocks, "sleb")
    n = len(adapter.units(unit))
    keep = keep_mask(n, removed)
    allowed = [j for j in range(n) if keep[j] and j not in set(protected)]
    steps = len(allowed) - 1 if steps is None else steps
    if steps < 1 or steps > len(allowed) or steps >= sum(keep):
        raise LayerpruneError(f"sleb can take 1..{min(len(allowed), sum(keep) - 1)} steps here, not {steps}")
    evaluator = MaskEvaluator(
        model,
        adapter,
        windows.input_ids,
        granularity=unit,
        store=store,
        batch_size=batch_size,
        progress=progress,
    )
    order, ppl_after = [], []
    for _ in range(steps):
        candidates = [j for j in allowed if keep[j]]
        masks = leave_one_out(keep, candidates)
        ppls = evaluator.ppl(masks)
        best = min(range(len(candidates)), key=lambda c: ppls[c])
        keep[candidates[best]] = False
        order.append(candidates[best])
        ppl_after.append(ppls[best])
    importance: list[float | None] = [
        None if removed is not None and removed[j] else float(steps + 1) for j in range(n)
    ]
    for step, j in enumerate(order, 1):
        importance[j] = float(step)
    return MethodScores(
        importance,
        {
            "order": order,
            "ppl_after_step": ppl_after,
            "evaluations": evaluator.evaluations,
            "block_calls": evaluator.runner.block_calls,
            "protected": sorted(protected),
        },
    )
