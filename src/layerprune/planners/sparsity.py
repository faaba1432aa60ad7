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
    allocation: str,
    pruner: str,
    windows,
    *,
    nm: tuple[int, int] | None = None,
    epsilon: float | None = None,
    metric: str = "alpha_peak",
    lower_bound: str = "reference",
    hyper_m: float = 5.0,
    lam: float = 0.08,
    clip: bool = False,
    batch_size: int = 8,
    offload: str = "memory",
    progress: bool = True,
):
    """A sparsity plan: a target per linear layer, the pruner and its calibration."""
    from ..plans import Plan
    from ..provenance import stamp
    from ..pruners.unstructured import PRUNERS
    from ..scorers.run import model_info, run

    check_target(sparsity)
    if allocation not in ALLOCATIONS:
        raise LayerpruneError(f"unknown allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")
    if pruner not in PRUNERS:
        raise LayerpruneError(f"unknown pruner '{pruner}'; use one of {', '.join(PRUNERS)}")
    names = lm.adapter.layer_names()
    numel = [lm.adapter.layer(n).weight.numel() for n in names]
    params: dict = {
        "target": sparsity,
        "allocation": allocation,
        "pruner": pruner,
        "nm": list(nm) if nm else None,
    }
    scores = None
    if allocation == "uniform":
        layers = uniform(names, sparsity)
    elif allocation == "alpha":
        # The reference scripts' defaults: eps 0.3 with magnitude, 0.2 with Wanda and SparseGPT.
        epsilon = epsilon if epsilon is not None else (0.3 if pruner == "magnitude" else 0.2)
        s = run(lm, "alpha", None, progress=progress, metric=metric, lower_bound=lower_bound)
        layers = alpha(names, numel, s.extra["metric_values"], sparsity, epsilon, clip=clip)
        scores = s.extra["metric_values"]
        params.update(epsilon=epsilon, metric=metric, lower_bound=lower_bound, clip=clip)
    else:
        s = run(
            lm, "owl", windows, progress=progress, hyper_m=hyper_m, batch_size=batch_size, offload=offload
        )
        layers = owl(names, s.importance, sparsity, lam)
        scores = s.importance
        params.update(hyper_m=hyper_m, owl_lambda=lam)
    if nm:
        from ..pruners.unstructured import nm_for

        params["nm_per_layer"] = {n: list(nm_for(v, nm)) for n, v in layers.items()}
    return Plan(
        kind="sparsity",
        model=model_info(lm),
        method=allocation,
        params=params,
        sparsity={"pruner": pruner, "nm": list(nm) if nm else None, "layers": layers},
        scores=scores,
        calibration=windows.protocol if windows is not None else None,
        seed=windows.protocol.get("seed") if windows is not None else None,
        provenance=stamp(),
    )
