"""Stratified sampling of layer masks by the number of kept blocks.

The reference hard-codes kept counts 30, 27, 24, 21, 18 for 32 blocks, i.e. removing 2 .. 14 blocks
around a target of 6 to 12. Here the strata are derived from L and the target removal ratio r: five
removal counts evenly spaced from round(0.06 L) (at least 1) to round(min(0.45, 1.75 r) L), which gives
exactly the reference's strata for L = 32, r = 0.25. Within a stratum, masks are drawn uniformly
without repetition; the budget is split evenly (a stratum smaller than its share is taken whole and
its remainder goes to the others).
"""

from __future__ import annotations

import math
import random

from ...errors import LayerpruneError


def default_strata(L: int, ratio: float = 0.25, count: int = 5) -> list[int]:
    """Kept-block counts of the strata, descending."""
    lo = max(1, round(0.06 * L))
    hi = max(lo, min(L - 1, round(min(0.45, 1.75 * ratio) * L)))
    removed = sorted({round(lo + (hi - lo) * k / (count - 1)) for k in range(count)})
    return sorted((L - r for r in removed), reverse=True)


def check_strata(strata: list[int], L: int, budget: int) -> None:
    bad = [k for k in strata if not 1 <= k <= L - 1]
    if bad:
        raise LayerpruneError(f"strata {bad} are outside 1..{L - 1}: a stratum is a number of kept blocks")
    if budget < len(strata):
        raise LayerpruneError(f"a budget of {budget} masks cannot cover {len(strata)} strata; raise --budget")


def stratified_masks(L: int, strata: list[int], budget: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`budget` distinct masks (1 = keep), as evenly as possible over the strata, reproducibly."""
    check_strata(strata, L, budget)
    rng = random.Random(seed)
    sizes = {k: math.comb(L, k) for k in strata}
    share = {k: 0 for k in strata}
    left = budget
    open_ = sorted(strata, key=lambda k: sizes[k])
    while left > 0 and open_:
        per = max(1, left // len(open_))
        for k in list(open_):
            take = min(per, sizes[k] - share[k], left)
            share[k] += take
            left -= take
            if share[k] == sizes[k]:
                open_.remove(k)
            if left == 0:
                break
    masks: list[tuple[int, ...]] = []
    for k in strata:
        seen: set[tuple[int, ...]] = set()
        if share[k] == sizes[k]:
            import itertools

            chosen = [
                tuple(1 if i in c else 0 for i in range(L)) for c in itertools.combinations(range(L), k)
            ]
            rng.shuffle(chosen)
        else:
            chosen = []
            while len(chosen) < share[k]:
                keep = set(rng.sample(range(L), k))
                m = tuple(1 if i in keep else 0 for i in range(L))
                if m not in seen:
                    seen.add(m)
                    chosen.append(m)
        masks.extend(chosen)
    return masks
