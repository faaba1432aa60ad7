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
from ..plans import DepthPlan
from ..provenance import stamp
from ..scorers.base import Scores, protected_blocks


def units_to_remove(n: int, remove: int | None, ratio: float | None) -> int:
    """How many of n units `--remove N` or `--ratio R` means: R is a fraction of the units, rounded."""
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
) -> DepthPlan:
    """`recheck=K`: among the removal sets drawn from the count + 2 least important units, evaluate the
    K with the lowest summed importance for real (`evaluate(sets) -> calibration ppl`), keep the best."""
    scores.require("depth")
    L = scores.model["num_blocks"]
    units = [Unit.parse(u) for u in scores.units]
    protected = protected_blocks(protect, L, scores.method)
    allowed = [j for j, u in enumerate(units) if u.block not in protected]
    count = units_to_remove(len(scores.units), remove, ratio)
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
    return DepthPlan(
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


def plan_depth(
    lm,
    scores: Scores,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    protect: str | Sequence[int] | None = None,
    iterative: bool = False,
    recheck: int = 0,
    calib: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> DepthPlan:
    """A depth plan for a model: `lm` is a loaded model, or its name when neither `iterative` nor
    `recheck` needs to run it (the model is then loaded only if needed). Re-scoring and re-checking
    use the calibration windows the scores recorded (or the same draw from `calib`)."""
    from ..models.loading import LoadedModel, load, load_config

    scores.require("depth", lm if isinstance(lm, LoadedModel) else None)
    if isinstance(lm, LoadedModel):
        L, arch = lm.adapter.num_blocks, lm.adapter.spec.name
    else:
        from ..models.adapter import spec_for

        config = load_config(lm)
        L, arch = config.num_hidden_layers, spec_for(config).name
    expected = L * (1 if scores.unit == "block" else 2)
    if len(scores.units) != expected or scores.model.get("num_blocks") != L:
        raise LayerpruneError(
            f"the scores cover {len(scores.units)} {scores.unit} units but the model has {expected} "
            f"({arch}, {L} blocks); score this model with `layerprune score`"
        )
    rescore = evaluate = None
    needs_model = (iterative and scores.method not in ("sleb", "angular")) or recheck
    if needs_model:
        if not isinstance(lm, LoadedModel):
            lm = load(lm, quiet=not progress)
            scores.require("depth", lm)
        if scores.calibration is None:
            raise LayerpruneError("these scores recorded no calibration data; re-run `layerprune score`")
        from ..data import windows_from_protocol

        windows = windows_from_protocol(lm, scores.calibration, calib, what="the scores")
        if iterative:
            rescore = _rescorer(lm, scores, windows, progress)
        if recheck:
            evaluate = _set_evaluator(lm, scores, windows, batch_size, progress)
    return make_plan(
        scores,
        remove=remove,
        ratio=ratio,
        protect=protect,
        iterative=iterative,
        rescore=rescore,
        recheck=recheck,
        evaluate=evaluate,
    )


def _rescorer(lm, scores: Scores, windows, progress: bool):
    """rescore(removed) -> the importance of the units left, by the scores' own method and options."""
    from ..scorers.run import run

    params = {k: v for k, v in scores.params.items() if k in ("batch_size", "norm_power")}

    def rescore(removed):
        return run(
            lm, scores.method, windows, unit=scores.unit, removed=removed, progress=progress, **params
        ).importance

    return rescore


def _set_evaluator(lm, scores: Scores, windows, batch_size: int | None, progress: bool):
    """evaluate(sets of unit indices) -> the real calibration perplexity without each set."""
    from ..engine.masked import MaskEvaluator

    evaluator = MaskEvaluator(
        lm.model,
        lm.adapter,
        windows.input_ids,
        granularity=scores.unit,
        batch_size=batch_size or 16,
        progress=progress,
    )
    n = len(scores.units)

    def evaluate(sets):
        return evaluator.ppl([[0 if j in s else 1 for j in range(n)] for s in sets])

    return evaluate


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
