"""Width plans: a structured pruning rate per block, turned into KV groups and MLP channels to remove.

A rate r_i is the fraction of block i's prunable parameters (its attention and MLP projections) to
remove; the parameter-weighted mean of the rates is the target beta. In block i, round(r_i * G) of
its G KV groups go first (never all of them), then as many MLP channels as bring the block's removed
parameters closest to r_i of them: a block's rate is met to within one channel even when a model
has only a few KV groups. Which groups and channels go is decided by structured scores computed
once on the dense model (`wanda-sp` by default), so any rate vector becomes a mask with no more data.

Allocations: `uniform` (every r_i = beta), `owl` and `alpha` (the sparsity allocators of OWL and
AlphaPruning applied per block, read as structured rates), `search` (Self-Pruner's
evolutionary search, classic or LLM operators, fitness = calibration perplexity under the mask),
and `flap` (FLAP's AL-AM structure: every group and channel of every block in one global ranking
of standardized FLAP scores, see `flap_decision`). Any allocation may take FLAP scores; the pruner
is then `flap` and the removed features' mean contribution is added to the o / down biases.
"""

from __future__ import annotations

import math

from ..errors import LayerpruneError
from ..models.width import layout
from ..models.width_decisions import BlockBudget, Deployable, achieved, budgets, counts
from .width_search import fitness_calibration, search_rates

ALLOCATIONS = ("uniform", "owl", "alpha", "search", "flap")


def _standardize(x: list[float]) -> list[float]:
    """(x - mean) / std over the values, std with N - 1 (torch.std's default, as FLAP's code)."""
    n = len(x)
    mean = sum(x) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else 0.0
    return [(v - mean) / std if std > 0 else 0.0 for v in x]


def flap_unit_scores(adapter, table: dict) -> tuple[list[list[float]], list[list[float]]]:
    """FLAP's AL-AM scores of every KV group and MLP channel, comparable across blocks and parts.

    As FLAP's code: per block, the attention metric is WIFV^2 per o input feature, standardized over
    the block's features, and a head scores the mean of its features (here a KV group: the mean
    over its query heads' features); the MLP metric is WIFV per channel, standardized over the
    block's channels."""
    role = adapter.spec.output_roles["attn"]
    groups, channels = [], []
    for i, (feats, chans) in enumerate(zip(table["attn_features"], table["channels"])):
        z = _standardize([v * v for v in feats])
        _, idx = layout(adapter, i, "attn")[role]
        groups.append([sum(z[j] for j in row) / len(row) for row in idx.tolist()])
        channels.append(_standardize(list(chans)))
    return groups, channels


def flap_decision(adapter, table: dict, width: float, blocks: list[BlockBudget]) -> list[tuple[int, int]]:
    """(groups removed, channels removed) per block by FLAP's adaptive structure (AL-AM).

    Every KV group and channel of the model is ranked by its standardized score
    (`flap_unit_scores`), lowest first, each weighing the parameters it owns (FLAP's code weighs a
    head 512/3 channels: 4 * head_dim * hidden against 3 * hidden, for Llama's MHA; here the real
    counts of the layout, so GQA groups and biases count as they are). Units go in that order,
    except one that would remove a block's last group or channel, and the number removed is the one
    whose removed parameters come closest to `width` of the blocks' prunable parameters."""
    gs, cs = flap_unit_scores(adapter, table)
    order = sorted(
        [(v, i, 0, j) for i, row in enumerate(gs) for j, v in enumerate(row)]
        + [(v, i, 1, j) for i, row in enumerate(cs) for j, v in enumerate(row)]
    )
    total = sum(b.params for b in blocks)
    target = width * total
    left = [[b.groups, b.channels] for b in blocks]
    removed = [[0, 0] for _ in blocks]
    done = 0
    for _, i, kind, _ in order:
        if left[i][kind] <= 1:
            continue  # never a block's last KV group or channel
        cost = blocks[i].group_params if kind == 0 else blocks[i].channel_params
        if done + cost > target and abs(done + cost - target) >= abs(done - target):
            break  # removing it would move away from the target
        left[i][kind] -= 1
        removed[i][kind] += 1
        done += cost
        if done >= target:
            break
    return [(g, c) for g, c in removed]


def check_target(width: float) -> None:
    if not 0 < width < 1:
        raise LayerpruneError(f"--width {width} must be in (0, 1): the fraction of parameters to remove")


def check_request(
    width,
    allocation="uniform",
    *,
    p_min=None,
    p_max=None,
    operators="classic",
    llm=None,
    log=None,
    store=None,
    fitness_samples=None,
    fitness_seqlen=None,
    deploy=None,
    channel_multiple=None,
    pruner=None,
):
    """What can be refused before any data is read: the target, the allocation, the search bounds,
    the deployment format."""
    check_target(width)
    if deploy not in (None, "decilm"):
        raise LayerpruneError(f"--deploy {deploy}: the one deployable format is decilm")
    if deploy is None and channel_multiple is not None:
        raise LayerpruneError("--channel-multiple sizes a deployable plan; add --deploy decilm")
    if deploy and (allocation == "flap" or pruner == "flap"):
        raise LayerpruneError(
            "--deploy decilm: FLAP's bias compensation has no place in a DeciLM model; use another "
            "allocation and --pruner wanda-sp or magnitude-sp"
        )
    if deploy and channel_multiple is not None:
        from ..models.decilm import check_channel_multiple

        check_channel_multiple(channel_multiple)
    if allocation not in ALLOCATIONS:
        raise LayerpruneError(f"unknown allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")
    if allocation == "search":
        from .search import DEFAULT_P_MAX, DEFAULT_P_MIN, check_bounds

        check_bounds(
            width, DEFAULT_P_MIN if p_min is None else p_min, DEFAULT_P_MAX if p_max is None else p_max
        )
        if operators == "llm" and llm is None:
            raise LayerpruneError(
                "--operators llm needs --llm-url and --llm-model (or use --operators classic)"
            )
        if operators == "llm":  # an endpoint that is down fails now, not after the scoring
            from .search.llm import check_endpoint

            check_endpoint(llm)
    elif any(v is not None for v in (p_min, p_max, log, store)) or operators != "classic" or llm is not None:
        raise LayerpruneError(
            "--p-min, --p-max, --store, --log and the operators shape a search; add --allocation search"
        )
    elif fitness_samples is not None or fitness_seqlen is not None:
        raise LayerpruneError("--fitness-samples and --fitness-seqlen size a search; add --allocation search")


def allocation_rates(
    lm, width: float, allocation: str, windows=None, *, epsilon: float = 0.2, lam: float = 0.08, progress=True
):
    """Per-block rates with parameter-weighted mean `width`, by a hand-made allocation rule."""
    from ..scorers.run import run
    from . import sparsity as sp

    L = lm.adapter.num_blocks
    if allocation == "uniform":
        return [width] * L
    names = [str(i) for i in range(L)]
    numel = [b.params for b in budgets(lm.adapter)]
    if allocation == "owl":
        if windows is None:
            raise LayerpruneError("OWL rates need calibration windows")
        s = run(lm, "owl", windows, progress=progress)
        rates = sp.owl(names, s.importance, width, lam)
        return [rates[n] for n in names]
    if allocation == "alpha":
        s = run(lm, "alpha", None, progress=progress)
        rates = sp.alpha(names, numel, s.extra["block_values"], width, epsilon)
        return [rates[n] for n in names]
    raise LayerpruneError(f"unknown allocation '{allocation}'; use one of {', '.join(ALLOCATIONS)}")


def make_plan(
    lm,
    width: float,
    allocation: str = "uniform",
    windows=None,
    *,
    scores=None,
    fitness_windows=None,
    fitness_samples: int | None = None,
    fitness_seqlen: int | None = None,
    pruner: str | None = None,
    store=None,
    operators: str = "classic",
    llm=None,
    population: int = 30,
    crossovers: int = 10,
    mutations: int = 10,
    iterations: int = 20,
    seed: int = 0,
    p_min: float | None = None,
    p_max: float | None = None,
    log: str | None = None,
    epsilon: float = 0.2,
    lam: float = 0.08,
    batch_size: int = 16,
    deploy: str | None = None,
    channel_multiple: int | None = None,
    progress: bool = True,
):
    """A width plan for `width` of the blocks' prunable parameters removed.

    `windows`: calibration of the structured scores (and OWL); `fitness_windows`: the search's
    calibration; by default `fitness_samples` x `fitness_seqlen` tokens (the depth papers' 10 x 128
    unless given) drawn from the same text source, seed and BOS policy as `windows`, so that a
    search on the user's own text never reaches for a default corpus; `store`: an EvalStore path or
    object for the search's fitness evaluations. `pruner` (the scores' method when `scores` are
    given): `flap` for the flap allocation, `wanda-sp` for the others, by default. `deploy`
    ("decilm"): every decision, the search's candidates included, keeps to what the DeciLM format
    carries (`models/width_decisions.py` `Deployable`, MLP widths in multiples of `channel_multiple`,
    256 by default), and the blocks' removed parameters meet `width` to within DEPLOY_TOLERANCE."""
    from ..plans import WidthPlan
    from ..provenance import stamp
    from ..scorers.run import model_info, run

    check_request(
        width, allocation, p_min=p_min, p_max=p_max, operators=operators, llm=llm, log=log, store=store,
        fitness_samples=fitness_samples, fitness_seqlen=fitness_seqlen, deploy=deploy,
        channel_multiple=channel_multiple, pruner=pruner,
    )  # fmt: skip
    blocks = budgets(lm.adapter)
    rule = decide = None
    if deploy:  # what the format cannot state is refused before any scoring
        from ..models.decilm import FFN_MULTIPLE, check_deployable

        channel_multiple = channel_multiple or FFN_MULTIPLE
        check_deployable(lm.adapter, channel_multiple)
        rule = Deployable(channel_multiple)
        rule.check_shapes(width, blocks)
    if scores is None:
        pruner = pruner or ("flap" if allocation == "flap" else "wanda-sp")
        if allocation == "flap" and pruner != "flap":
            raise LayerpruneError(f"the flap allocation ranks FLAP scores; drop --pruner {pruner}")
        scores = run(lm, pruner, windows, progress=progress)
    else:
        scores.require("width", lm)
        pruner = scores.method
    if allocation == "flap" and pruner != "flap":
        raise LayerpruneError(
            f"the flap allocation ranks FLAP scores, not {pruner}; score with --method flap or drop --scores"
        )
    table = scores.extra
    params: dict = {"target": width, "allocation": allocation, "pruner": pruner}
    extra: dict = {}
    if rule is not None:
        rule.check_target(width, blocks, rule.decision([width] * len(blocks), blocks, table, width))

        def decide(rates):  # the search's candidates: a rate's place within its step picks among equal costs
            return rule.decision(rates, blocks, table, width, position=allocation == "search")

        params.update(deploy=deploy, channel_multiple=channel_multiple)
    if allocation == "search":
        if fitness_windows is None:
            fitness_windows = fitness_calibration(lm, windows, fitness_samples, fitness_seqlen)
        seeds = {"uniform": [width] * len(blocks)}
        for name in ("owl", "alpha"):
            try:
                seeds[name] = allocation_rates(
                    lm, width, name, windows, epsilon=epsilon, lam=lam, progress=progress
                )
            except LayerpruneError:
                continue  # an allocation that is infeasible at this width does not seed the population
        if rule is not None:  # the allocations' own deployable decisions, as genomes that decode to them
            seeds = {
                k: rule.encode(rule.decision(r, blocks, table, width), blocks, table)
                for k, r in seeds.items()
            }
        rates, extra = search_rates(
            lm, width, table, blocks, fitness_windows, seeds=seeds, store=store, operators=operators, llm=llm,
            population=population, crossovers=crossovers, mutations=mutations, iterations=iterations, seed=seed,
            p_min=p_min, p_max=p_max, log=log, batch_size=batch_size, progress=progress, decide=decide,
        )  # fmt: skip
        params.update(operators=operators, population=population, crossovers=crossovers, mutations=mutations,
                      iterations=iterations, seed=seed, p_min=extra["p_min"], p_max=extra["p_max"])  # fmt: skip
    elif allocation == "flap":
        decision = flap_decision(lm.adapter, table, width, blocks)
        rates = achieved(decision, blocks)
        params["structure"] = "AL-AM"
    else:
        rates = allocation_rates(lm, width, allocation, windows, epsilon=epsilon, lam=lam, progress=progress)
        if allocation == "alpha":
            params["epsilon"] = epsilon
        if allocation == "owl":
            params["owl_lambda"] = lam
    if decide is not None:
        decision = decide(rates)
        rule.check_target(width, blocks, decision)
    elif allocation != "flap":
        decision = counts(rates, blocks)
    got = achieved(decision, blocks)
    total = sum(b.params for b in blocks)
    params.update(
        rates=rates,
        achieved_rates=got,
        achieved=sum(r * b.params for r, b in zip(got, blocks)) / total,
        removed={"groups": [g for g, _ in decision], "channels": [c for _, c in decision]},
    )
    return WidthPlan(
        model=model_info(lm),
        method=allocation,
        params=params,
        attn=[g / b.groups for (g, _), b in zip(decision, blocks)],
        mlp=[c / b.channels for (_, c), b in zip(decision, blocks)],
        pruner=pruner,
        deploy=deploy,
        channel_multiple=channel_multiple if deploy else None,
        scores=scores.importance,
        calibration=scores.calibration,
        seed=seed if allocation == "search" else (scores.calibration or {}).get("seed"),
        provenance=stamp(),
        extra=extra,
    )
