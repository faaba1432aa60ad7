"""Depth plans: from per-unit importance to the units to remove.

- one-shot: remove the N least important units that are not protected;
- iterative: remove one, re-score the rest with the same method, repeat (re-scoring is a callback);
- angular: remove the contiguous span of N blocks with the smallest angular distance.
The protected set is a parameter: "plus" is Shortened LLaMA's Taylor+ rule {0, 1, 2, 3, L-2, L-1}
(the default for taylor), SLEB keeps the first and last blocks, the other methods protect nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import combinations

from ..errors import LayerpruneError
from ..models.adapter import Unit
from ..plans import Plan
from ..provenance import stamp
from ..scorers.base import Scores

DEFAULT_PROTECT = {"taylor": "plus", "sleb": "ends"}


def protected_blocks(spec: str | Sequence[int] | None, num_blocks: int, method: str) -> list[int]:
    """'plus', 'ends', 'none', 'default' or a list like '0,1,-1' (negative counts from the end)."""
    if spec is None or spec == "default":
        spec = DEFAULT_PROTECT.get(method, "none")
    L = num_blocks
    if spec == "none":
        return []
    if spec == "plus":
        return sorted({0, 1, 2, 3, L - 2, L - 1} & set(range(L)))
    if spec == "ends":
        return sorted({0, L - 1})
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        try:
            i = int(item)
        except ValueError:
            raise LayerpruneError(
                f"--protect '{spec}': use plus, ends, none or block indices like 0,1,-1"
            ) from None
        if not -L <= i < L:
            raise LayerpruneError(f"--protect: block {i} does not exist in a model of {L} blocks")
        out.add(i % L)
    return sorted(out)


def units_to_remove(scores: Scores, remove: int | None, ratio: float | None) -> int:
    """How many units `--remove N` or `--ratio R` means: R is a fraction of the units, rounded."""
    n = len(scores.units)
    if (remove is None) == (ratio is None):
        raise LayerpruneError("say how much to remove: --remove N or --ratio R (one of them)")
    if remove is not None:
        count = remove
    else:
        if not 0 < ratio < 1:
            raise LayerpruneError(f"--ratio {ratio} must be between 0 and 1")
        count = round(ratio * n)
    if count < 1:
        raise LayerpruneError(f"nothing to remove: --remove must be at least 1 (got {count})")
    return count


def _check_count(count: int, scores: Scores, allowed: list[int]) -> None:
    L = scores.model["num_blocks"]
    if scores.unit == "block" and count >= L:
        raise LayerpruneError(
            f"cannot remove {count} of {L} blocks; keep at least one (use --remove {L - 1} or less)"
        )
    if count > len(allowed):
        raise LayerpruneError(
            f"only {len(allowed)} units are not protected, fewer than the {count} to remove; "
            "protect fewer blocks (--protect none or a shorter list) or remove fewer"
        )


def make_plan(
    scores: Scores,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    protect: str | Sequence[int] | None = None,
    iterative: bool = False,
    rescore: Callable[[list[bool]], list[float | None]] | None = None,
    recheck: int = 0,
    evaluate: Callable[[list[list[int]]], list[float]] | None = None,
) -> Plan:
    """`recheck=K`: among the removal sets drawn from the count + 2 least important units, evaluate the
    K with the lowest summed importance for real (`evaluate(sets) -> calibration ppl`), keep the best."""
    L = scores.model["num_blocks"]
    units = [Unit.parse(u) for u in scores.units]
    protected = protected_blocks(protect, L, scores.method)
    allowed = [j for j, u in enumerate(units) if u.block not in protected]
    count = units_to_remove(scores, remove, ratio)
    _check_count(count, scores, allowed)
    history = []
    if scores.method == "angular":
        if scores.unit != "block":
            raise LayerpruneError("angular plans cut whole blocks; use --unit block")
        chosen = _angular_span(scores, count, protected)
    elif iterative and scores.method != "sleb":
        if rescore is None:
            raise LayerpruneError("--iterative needs the model to re-score; pass MODEL to `layerprune plan`")
        removed = [False] * len(units)
        importance = scores.importance
        chosen = []
        for _ in range(count):
            j = _lowest(importance, [a for a in allowed if not removed[a]])
            removed[j] = True
            chosen.append(j)
            history.append({"removed": str(units[j]), "importance": importance[j]})
            if len(chosen) < count:
                importance = rescore(removed)
    else:
        ranked = sorted(allowed, key=lambda j: _key(scores.importance[j]))
        chosen = ranked[:count]
        if recheck:
            if evaluate is None:
                raise LayerpruneError("--recheck needs the model to evaluate candidates; pass MODEL")
            pool = ranked[: count + 2]
            sets = sorted(combinations(pool, count), key=lambda c: sum(_key(scores.importance[j]) for j in c))
            sets = [sorted(c) for c in sets[:recheck]]
            ppls = evaluate(sets)
            chosen = sets[min(range(len(sets)), key=lambda k: ppls[k])]
            history = [
                {"removed": [str(units[j]) for j in c], "calibration_ppl": p} for c, p in zip(sets, ppls)
            ]
    remove_units = [str(units[j]) for j in sorted(chosen, key=lambda j: units[j])]
    return Plan(
        kind="depth",
        model=dict(scores.model),
        method=scores.method,
        unit=scores.unit,
        remove=remove_units,
        params={
            "remove": count,
            "ratio": ratio,
            "iterative": iterative,
            "protected": protected,
            **scores.params,
        },
        scores=scores.importance,
        calibration=scores.calibration,
        seed=(scores.calibration or {}).get("seed"),
        provenance=stamp(),
        extra=({"recheck": history} if recheck else {"iterations": history}) if history else {},
    )


def _key(v: float | None) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _lowest(importance: Sequence[float | None], candidates: list[int]) -> int:
    return min(candidates, key=lambda j: (_key(importance[j]), j))


def _angular_span(scores: Scores, n: int, protected: list[int]) -> list[int]:
    spans = scores.extra.get("spans", {}).get(str(n))
    if spans is None:
        raise LayerpruneError(
            f"the angular scores have no spans of {n} blocks; re-run `layerprune score --method angular`"
        )
    starts = [s for s in range(len(spans)) if not set(range(s, s + n)) & set(protected)]
    if not starts:
        raise LayerpruneError(f"every span of {n} blocks touches a protected block; protect fewer blocks")
    best = min(starts, key=lambda s: spans[s])
    return list(range(best, best + n))
