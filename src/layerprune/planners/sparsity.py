"""Per-layer sparsity allocations: uniform, AlphaPruning, OWL. Each returns {'block.role': sparsity}
whose parameter-weighted mean is the target (OWL: whose block mean is, as the reference).

AlphaPruning (`lib/prune.py: ww_sparsity` of its repository): the per-layer metric (alpha_peak by
default) is averaged per block and broadcast to the block's layers; ratios are mapped linearly into
[1 - eps, 1 + eps] (higher alpha: a lighter tail, a less trained layer: pruned more) and scaled by
target * sum(numel) / sum(numel * r). The reference never clips, so a block can get a sparsity >= 1
(LLaMA-7B at 80%, eps 0.3 gives 1.063): that is an error here naming the largest eps that fits, or,
with clip=True, ratios are clipped to [0, 0.99] and the others rescaled to keep the mean.

OWL: block outlier ratios D (percent) min-max scaled to [0, 2 * lambda], re-centred so the mean
density is 1 - target, sparsity = 1 - density (more outliers: pruned less).
"""

from __future__ import annotations

from ..errors import LayerpruneError

ALLOCATIONS = ("uniform", "alpha", "owl")
MAX_SPARSITY = 0.99


def check_target(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise LayerpruneError(f"--sparsity {sparsity} must be in [0, 1)")


def uniform(names: list[str], sparsity: float) -> dict[str, float]:
    check_target(sparsity)
    return {n: sparsity for n in names}


def _block_of(name: str) -> int:
    return int(name.split(".")[0])


def alpha(
    names: list[str],
    numel: list[int],
    metric: list[float],
    sparsity: float,
    epsilon: float = 0.3,
    block_wise: bool = True,
    clip: bool = False,
) -> dict[str, float]:
    check_target(sparsity)
    if not 0 <= epsilon < 1:
        raise LayerpruneError(f"--epsilon {epsilon} must be in [0, 1)")
    ratios = _alpha_ratios(names, numel, metric, sparsity, epsilon, block_wise)
    worst = max(ratios)
    if worst >= 1 or min(ratios) < 0:
        if not clip:
            raise LayerpruneError(
                f"with --epsilon {epsilon} a layer would get sparsity {worst:.3f} >= 1; "
                f"use --epsilon {largest_epsilon(names, numel, metric, sparsity, block_wise):.3f} or less, or --clip"
            )
        ratios = _clip_renormalise(ratios, numel, sparsity)
    return dict(zip(names, ratios))


def _alpha_ratios(names, numel, metric, sparsity, epsilon, block_wise) -> list[float]:
    if block_wise:
        blocks: dict[int, list[float]] = {}
        for n, m in zip(names, metric):
            blocks.setdefault(_block_of(n), []).append(m)
        means = {b: sum(v) / len(v) for b, v in blocks.items()}
        metric = [means[_block_of(n)] for n in names]
    lo, hi = min(metric), max(metric)
    if hi == lo:
        return [sparsity] * len(names)
    s1, s2 = 1 - epsilon, 1 + epsilon
    r = [(m - lo) / (hi - lo) * (s2 - s1) + s1 for m in metric]
    scale = sparsity * sum(numel) / sum(p * x for p, x in zip(numel, r))
    return [x * scale for x in r]


def largest_epsilon(names, numel, metric, sparsity, block_wise) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        r = _alpha_ratios(names, numel, metric, sparsity, mid, block_wise)
        if max(r) < MAX_SPARSITY and min(r) >= 0:
            lo = mid
        else:
            hi = mid
    return lo


def _clip_renormalise(ratios: list[float], numel: list[int], sparsity: float) -> list[float]:
    """Clip to [0, MAX_SPARSITY] and rescale the unclipped layers until the weighted mean is the target."""
    r = list(ratios)
    total = sum(numel)
    for _ in range(100):
        r = [min(max(x, 0.0), MAX_SPARSITY) for x in r]
        free = [i for i, x in enumerate(r) if 0 < x < MAX_SPARSITY]
        fixed = sum(numel[i] * r[i] for i in range(len(r)) if i not in set(free))
        want = sparsity * total - fixed
        have = sum(numel[i] * r[i] for i in free)
        if not free or have <= 0:
            break
        scale = want / have
        r = [x * scale if i in set(free) else x for i, x in enumerate(r)]
        if all(0 <= x <= MAX_SPARSITY for x in r):
            break
    return r


def owl(names: list[str], outlier_ratio: list[float], sparsity: float, lam: float = 0.08) -> dict[str, float]:
    """`outlier_ratio` per block (percent). Every layer of a block gets the block's sparsity."""
    check_target(sparsity)
    D = list(outlier_ratio)
    lo, hi = min(D), max(D)
    scaled = [0.0] * len(D) if hi == lo else [(d - lo) / (hi - lo) * (2 * lam) for d in D]
    mean = sum(scaled) / len(scaled)
    density = [d - mean + (1 - sparsity) for d in scaled]
    block_sparsity = [1 - d for d in density]
    if max(block_sparsity) >= 1 or min(block_sparsity) < 0:
        raise LayerpruneError(
            f"OWL with lambda {lam} puts a block outside [0, 1); use a smaller --owl-lambda"
        )
    return {n: block_sparsity[_block_of(n)] for n in names}


def make_plan(
    lm,
    sparsity: float,
    allocation: str = "uniform",
    pruner: str = "wanda",
    windows=None,
    *,
    scores=None,
    nm: tuple[int, int] | str | None = None,
    epsilon: float | None = None,
    metric: str | None = None,
    lower_bound: str | None = None,
    filter_zeros: bool | None = None,
    hyper_m: float | None = None,
    lam: float = 0.08,
    clip: bool = False,
    batch_size: int = 8,
    offload: str = "memory",
    progress: bool = True,
):
    """A sparsity plan: a target per linear layer, the pruner, and the calibration it will use.

    `scores`: the alpha or OWL scores of this model (`layerprune score --method alpha|owl`); they
    are used as they are, and the metric options must agree with them. Without them, the allocation
    computes its metrics here (alpha from the weights, OWL from `windows`)."""
    from ..plans import SparsityPlan
    from ..provenance import stamp
    from ..registry import SPARSITY_PRUNERS, check_nm_target, nm_for, parse_nm
    from ..scorers.run import model_info, run

    check_target(sparsity)
    if allocation not in ALLOCATIONS:
        raise LayerpruneError(f"unknown allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")
    if pruner not in SPARSITY_PRUNERS:
        raise LayerpruneError(f"unknown pruner '{pruner}'; use one of {', '.join(SPARSITY_PRUNERS)}")
    nm = parse_nm(nm) if isinstance(nm, str) or nm is None else tuple(nm)
    if nm:  # the pattern is the target: N/M on average (alpha / owl: each layer's N follows its share)
        check_nm_target(sparsity, nm)
        sparsity = nm[0] / nm[1]
    names = lm.adapter.layer_names()
    numel = [lm.adapter.layer(n).weight.numel() for n in names]
    params: dict = {
        "target": sparsity,
        "allocation": allocation,
        "pruner": pruner,
        "nm": list(nm) if nm else None,
    }
    if scores is not None:
        _check_scores(scores, allocation, lm, names)
    values = None
    if allocation == "uniform":
        layers = uniform(names, sparsity)
    elif allocation == "alpha":
        # The reference scripts' defaults: eps 0.3 with magnitude, 0.2 with Wanda and SparseGPT.
        epsilon = epsilon if epsilon is not None else (0.3 if pruner == "magnitude" else 0.2)
        options = {"metric": metric, "lower_bound": lower_bound, "filter_zeros": filter_zeros}
        if scores is None:
            options = {k: v for k, v in options.items() if v is not None}
            scores = run(lm, "alpha", None, progress=progress, **options)
        else:
            _check_agrees(scores, options)
        values = scores.extra["metric_values"]
        layers = alpha(names, numel, values, sparsity, epsilon, clip=clip)
        params.update(
            epsilon=epsilon,
            metric=scores.extra["metric"],
            lower_bound=scores.extra["lower_bound"],
            filter_zeros=scores.extra.get("filter_zeros", False),
            clip=clip,
        )
    else:
        if scores is None:
            if windows is None:
                raise LayerpruneError(
                    "OWL needs calibration windows to find outliers (layerprune.calibration)"
                )
            m = 5.0 if hyper_m is None else hyper_m
            scores = run(
                lm, "owl", windows, progress=progress, hyper_m=m, batch_size=batch_size, offload=offload
            )
        else:
            _check_agrees(scores, {"hyper_m": hyper_m})
        values = scores.importance
        layers = owl(names, values, sparsity, lam)
        params.update(hyper_m=scores.params.get("hyper_m", 5.0), owl_lambda=lam)
    if nm:
        params["nm_per_layer"] = {n: list(nm_for(v, nm)) for n, v in layers.items()}
    if scores is not None:
        params["scores"] = {"method": scores.method, "calibration": scores.calibration}
    return SparsityPlan(
        model=model_info(lm),
        method=allocation,
        params=params,
        pruner=pruner,
        nm=list(nm) if nm else None,
        layers=layers,
        scores=values,
        calibration=windows.protocol if windows is not None else None,
        seed=windows.protocol.get("seed") if windows is not None else None,
        provenance=stamp(),
    )


def _check_scores(scores, allocation: str, lm, names: list[str]) -> None:
    scores.require("sparsity", lm)
    if allocation == "uniform":
        raise LayerpruneError(
            "a uniform allocation uses no scores; drop --scores or choose --allocation alpha|owl"
        )
    if scores.method != allocation:
        raise LayerpruneError(
            f"the scores are {scores.method} scores but the allocation is {allocation}; "
            f"pass --allocation {scores.method}, or score with --method {allocation}"
        )
    expected = names if allocation == "alpha" else [str(b) for b in range(lm.adapter.num_blocks)]
    if list(scores.units) != expected:
        raise LayerpruneError(
            f"the {allocation} scores cover {len(scores.units)} units, not the {len(expected)} of this model; re-score it"
        )


def _check_agrees(scores, options: dict) -> None:
    """An option given together with scores must be the one the scores were computed with."""
    recorded = {**scores.params, **scores.extra}
    for key, value in options.items():
        if value is not None and key in recorded and recorded[key] != value:
            raise LayerpruneError(
                f"the scores were computed with {key} {recorded[key]!r}, not {value!r}; "
                f"drop --{key.replace('_', '-')} or re-score with it"
            )
