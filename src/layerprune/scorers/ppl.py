"""PPL criterion (Shortened LLaMA): importance of a unit = calibration perplexity without it.

The reference builds a smaller copy of the model per block. Here unit j is skipped in place, and the
trie engine computes the hidden states entering unit j once for all candidates that share them, so
leave-one-out over L blocks costs about L/2 full forwards instead of L, with identical numbers.
"""

from __future__ import annotations

from ..engine.masked import MaskEvaluator
from .base import MethodScores, keep_mask, leave_one_out


def score(model, adapter, windows, *, unit="block", removed=None, batch_size=16, progress=True, store=None):
    n = len(adapter.units(unit))
    base = keep_mask(n, removed)
    candidates = [j for j in range(n) if base[j]]
    masks = leave_one_out(base, candidates)
    evaluator = MaskEvaluator(
        model,
        adapter,
        windows.input_ids,
        granularity=unit,
        store=store,
        batch_size=batch_size,
        progress=progress,
    )
    if len(candidates) == 1:  # the last unit cannot be removed
        ppls, base_ppl = [float("inf")], evaluator.ppl([base])[0]
    else:
        *ppls, base_ppl = evaluator.ppl(masks + [base])
    importance: list[float | None] = [None] * n
    for j, p in zip(candidates, ppls):
        importance[j] = p
    return MethodScores(
        importance,
        {
            "calibration_ppl": base_ppl,
            "evaluations": evaluator.evaluations,
            "block_calls": evaluator.runner.block_calls,
        },
    )
