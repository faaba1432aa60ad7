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

import json
import math
import statistics
import time
from dataclasses import dataclass

from ..errors import LayerpruneError

ALLOCATIONS = ("uniform", "owl", "alpha", "search", "flap")


@dataclass(frozen=True)
class BlockBudget:
    groups: int  # KV groups
    group_params: int  # parameters one group owns (weights and biases of q, k, v, o slices)
    channels: int  # MLP channels
    channel_params: int

    @property
    def params(self) -> int:
        return self.groups * self.group_params + self.channels * self.channel_params


def budgets(adapter) -> list[BlockBudget]:
    """Per block, how many groups and channels it has and what each owns, from the layout."""
    from ..pruners.width import layout

    out = []
    for i in range(adapter.num_blocks):
        sizes = []
        linears = adapter.linears(i)
        for part in ("attn", "mlp"):
            lay = layout(adapter, i, part)
            units = next(iter(lay.values()))[1].shape[0]
            per_unit = 0
            for role, (axis, idx) in lay.items():
                w = adapter.weight(linears[role])
                per_unit += idx.shape[1] * w.shape[1 - axis]
                bias = getattr(linears[role], "bias", None)
                if bias is not None and axis == 0:
                    per_unit += idx.shape[1]
            sizes += [units, per_unit]
        out.append(BlockBudget(*sizes))
    return out


def counts(rates: list[float], blocks: list[BlockBudget]) -> list[tuple[int, int]]:
    """(groups removed, channels removed) per block for the given rates."""
    if len(rates) != len(blocks):
        raise LayerpruneError(f"{len(rates)} rates for {len(blocks)} blocks; give one rate per block")
    out = []
    for r, b in zip(rates, blocks):
        g = min(max(round(r * b.groups), 0), b.groups - 1)
        rest = r * b.params - g * b.group_params
        c = min(max(round(rest / b.channel_params), 0), b.channels - 1)
        out.append((g, c))
    return out


def achieved(decision: list[tuple[int, int]], blocks: list[BlockBudget]) -> list[float]:
    return [(g * b.group_params + c * b.channel_params) / b.params for (g, c), b in zip(decision, blocks)]


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
    from ..pruners.width import layout

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


def decision_key(decision: list[tuple[int, int]]) -> str:
    """The store key of a structured mask: what is removed, block by block."""
    return "w:" + json.dumps(decision, separators=(",", ":"))


def masks_for(decision: list[tuple[int, int]], table: dict):
    """Keep all but the g lowest-scoring groups and the c lowest-scoring channels of each block.

    `table`: {"groups": [...], "channels": [...]} per block, e.g. the `extra` of structured scores."""
    from ..pruners.width import WidthMask

    masks = []
    for (g, c), gs, cs in zip(decision, table["groups"], table["channels"]):
        keep_g = sorted(sorted(range(len(gs)), key=lambda j: (gs[j], j))[g:])
        keep_c = sorted(sorted(range(len(cs)), key=lambda j: (cs[j], j))[c:])
        masks.append(WidthMask(groups=keep_g, channels=keep_c))
    return masks


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
):
    """What can be refused before any data is read: the target, the allocation, the search bounds."""
    check_target(width)
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


class Fitness:
    """Calibration perplexity of the model under the structured mask of a rate vector, in place,
    through an evaluation store when one is given (a killed search resumes without re-evaluating)."""

    def __init__(self, lm, table: dict, windows, *, store=None, batch_size: int = 16):
        self.lm, self.table, self.windows = lm, table, windows
        self.blocks = budgets(lm.adapter)
        self.store, self.batch_size = store, batch_size
        self.tokens = int(windows.input_ids.shape[0] * (windows.input_ids.shape[1] - 1))
        self.evaluations = 0  # real evaluations in this run (all ranks' under torchrun)
        self.forward_seconds: list[float] = []  # each real evaluation's masked forward, for overhead figures

    def key(self, rates: list[float]) -> str:
        return decision_key(counts(rates, self.blocks))

    def __call__(self, batch: list[list[float]]) -> list[float]:
        """Perplexity of each candidate; under torchrun the candidates that rank 0's store lacks are
        spread over the ranks (see layerprune.distributed), and only rank 0 has a store."""
        from ..distributed import spread

        keys = [self.key(r) for r in batch]
        rates = dict(zip(keys, batch))
        known: dict[str, float] = {}  # summed NLL: the one scalar per candidate that crosses ranks
        if self.store is not None:
            known = {k: nll for k, (nll, _) in self.store.get_many(keys).items()}

        def evaluate(share: list[str], on_value) -> list[float]:
            out = []
            for k in share:
                out.append(self.nll(rates[k]))
                on_value(k, out[-1])
            return out

        def record(k: str, nll: float) -> None:
            self.evaluations += 1  # every rank counts the job's evaluations
            if self.store is not None:
                self.store.put(k, nll, self.tokens)

        values = spread(keys, known, evaluate, record)
        return [math.exp(values[k] / self.tokens) for k in keys]

    def one(self, rates: list[float]) -> float:
        """Perplexity of one candidate, evaluated for real (no store)."""
        return math.exp(self.nll(rates) / self.tokens)

    def nll(self, rates: list[float]) -> float:
        """Summed calibration NLL of one candidate, evaluated for real (no store)."""
        from ..evaluation.perplexity import perplexity_of_windows
        from ..pruners.width import masked

        decision = counts(rates, self.blocks)
        masks = masks_for(decision, self.table)
        t0 = time.perf_counter()
        # FLAP scores: removed features read their calibration mean (the bias compensation)
        with masked(self.lm.adapter, masks, self.table.get("means")):
            r = perplexity_of_windows(
                self.lm.model, self.lm.adapter, self.windows, self.batch_size, progress=False
            )
        self.forward_seconds.append(time.perf_counter() - t0)
        return r.nll


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
    progress: bool = True,
):
    """A width plan for `width` of the blocks' prunable parameters removed.

    `windows`: calibration of the structured scores (and OWL); `fitness_windows`: the search's
    calibration; by default `fitness_samples` x `fitness_seqlen` tokens (the depth papers' 10 x 128
    unless given) drawn from the same text source, seed and BOS policy as `windows`, so that a
    search on the user's own text never reaches for a default corpus; `store`: an EvalStore path or
    object for the search's fitness evaluations. `pruner` (the scores' method when `scores` are
    given): `flap` for the flap allocation, `wanda-sp` for the others, by default."""
    from ..plans import WidthPlan
    from ..provenance import stamp
    from ..scorers.run import model_info, run

    check_request(
        width, allocation, p_min=p_min, p_max=p_max, operators=operators, llm=llm, log=log, store=store,
        fitness_samples=fitness_samples, fitness_seqlen=fitness_seqlen,
    )  # fmt: skip
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
    blocks = budgets(lm.adapter)
    params: dict = {"target": width, "allocation": allocation, "pruner": pruner}
    extra: dict = {}
    if allocation == "search":
        if fitness_windows is None:
            fitness_windows = fitness_calibration(lm, windows, fitness_samples, fitness_seqlen)
        rates, extra = _search(
            lm, width, table, blocks, windows, fitness_windows, store=store, operators=operators, llm=llm,
            population=population, crossovers=crossovers, mutations=mutations, iterations=iterations, seed=seed,
            p_min=p_min, p_max=p_max, log=log, epsilon=epsilon, lam=lam, batch_size=batch_size, progress=progress,
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
    if allocation != "flap":
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
        scores=scores.importance,
        calibration=scores.calibration,
        seed=seed if allocation == "search" else (scores.calibration or {}).get("seed"),
        provenance=stamp(),
        extra=extra,
    )


def decision_of(plan, blocks: list[BlockBudget]) -> list[tuple[int, int]]:
    """The groups and channels a width plan removes, block by block (its rates times the sizes)."""
    return [(round(a * b.groups), round(m * b.channels)) for a, m, b in zip(plan.attn, plan.mlp, blocks)]


def fitness_calibration(lm, windows, samples: int | None = None, seqlen: int | None = None):
    """The search's fitness windows: the depth papers' sizes (10 x 128) unless given, drawn from
    the text, seed and BOS policy that `windows` (the structured scores' calibration) came from."""
    from ..data import calibration

    source = seed = bos = None
    if windows is not None:
        p = windows.protocol
        source, seed, bos = p.get("dataset"), p.get("seed", 0), p.get("bos")
    return calibration(lm, source, samples=samples, seqlen=seqlen, seed=seed or 0, bos=bos, kind="depth")


def _search(lm, width, table, blocks, windows, fitness_windows, *, store, operators, llm, population,
            crossovers, mutations, iterations, seed, p_min, p_max, log, epsilon, lam, batch_size, progress):  # fmt: skip
    import contextlib
    from pathlib import Path

    from ..distributed import is_main
    from ..engine.store import EvalStore
    from .search import DEFAULT_P_MAX, DEFAULT_P_MIN, plot_history, search

    fw = fitness_windows
    seeds = {"uniform": [width] * len(blocks)}
    for name in ("owl", "alpha"):
        try:
            seeds[name] = allocation_rates(
                lm, width, name, windows, epsilon=epsilon, lam=lam, progress=progress
            )
        except LayerpruneError:
            continue  # an allocation that is infeasible at this width does not seed the population
    with contextlib.ExitStack() as stack:
        if isinstance(store, (str, Path)):  # under torchrun rank 0 owns the store
            store = (
                stack.enter_context(EvalStore(store, lm.fingerprint, fw.fingerprint, fw.protocol))
                if is_main()
                else None
            )
        fitness = Fitness(lm, table, fw, store=store, batch_size=batch_size)
        p_min = DEFAULT_P_MIN if p_min is None else p_min
        p_max = DEFAULT_P_MAX if p_max is None else p_max
        t0 = time.perf_counter()
        result = search(
            len(blocks), width, [b.params for b in blocks], fitness, fitness.key,
            population=population, crossovers=crossovers, mutations=mutations, iterations=iterations,
            seed=seed, seeds=seeds, operators=operators, llm=llm, log_path=log, progress=progress,
            p_min=p_min, p_max=p_max,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    if log is not None and is_main():
        plot_history(result.history, Path(log).with_suffix(".png"))
    extra = {
        "best_fitness": result.best_fitness,
        "fitness_calibration": fw.protocol,
        "evaluations_this_run": fitness.evaluations,
        "search_seconds": seconds,
        "forward_seconds_total": sum(fitness.forward_seconds),
        "forward_seconds_median": statistics.median(fitness.forward_seconds)
        if fitness.forward_seconds
        else None,
        "history": result.history,
        "operator_stats": result.stats,
        "p_min": p_min,
        "p_max": p_max,
    }
    return list(result.best_rates), extra
