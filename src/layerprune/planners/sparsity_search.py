"""Per-layer sparsity by search (EvoPress): the levels of a grid around the target, searched with
a level database of the chosen pruner and the KL divergence to the dense model as fitness.

The grid. A level step removes the same number of weights in every unit, `delta` = `step` x the
median unit size (units: linear layers, or whole blocks with `granularity="block"`): level l of a
unit of n weights is the target + l * delta / n, for |l| <= max_levels, within [0, 0.95]. The levels
of a candidate sum to zero, so every candidate removes exactly the target's share of the weights
(up to the pruner's rounding of a layer's count), however the layers differ in size.

The fitness of a candidate: its layers are copied from the database (`LevelDatabase.assign`: only
what changed), and the summed KL(dense || candidate) (or NLL) over the stage's windows is divided by
their tokens. Stage s of the multi-step selection uses the first `stage_windows[s]` fitness windows;
the values go through an evaluation store, so a killed search resumes without re-evaluating, and
under torchrun the candidates are spread over the ranks (each holds the model and reads the
database). api.py builds the database (pruners/levels.py) and calls `search_plan`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed import is_main, spread
from ..engine.store import EvalStore
from ..errors import LayerpruneError
from ..evaluation.divergence import DenseReference
from ..evaluation.perplexity import perplexity_of_windows
from .search.levels import Genome, LevelSearch, LevelSpace, key, search_levels

MAX_SPARSITY = 0.95
GRANULARITIES = ("layer", "block")


@dataclass
class SparsitySearch(LevelSearch):
    """The options of `layerprune plan --sparsity S --allocation search` and their defaults."""

    pruner: str = "wanda"
    granularity: str = "layer"
    levels: float = 0.05  # level step: this fraction of the median unit's weights
    max_levels: int = 8  # levels each side of the target (EvoPress's NUM_LEVELS)
    levels_db: str | None = None  # the level database folder (default: in the cache, keyed by its inputs)
    levels_inputs: str = "target"  # the database's statistics: on the model pruned at the target, or dense
    fitness: str = "kl"
    epsilon: float | None = None  # AlphaPruning's seed
    lam: float = 0.08  # OWL's seed


@dataclass
class LevelGrid:
    target: float
    granularity: str
    units: list[str]  # layer names ('3.q'), or block indices ('3')
    layers: list[list[str]]  # per unit, the linear layers it sets
    numel: list[int]
    delta: float  # weights per level step
    space: LevelSpace
    layer_numel: dict[str, int]

    def sparsity(self, u: int, level: int) -> float:
        return max(0.0, self.target + level * self.delta / self.numel[u])  # no -1e-17 at the lowest level

    def layer_sparsities(self) -> dict[str, list[float]]:
        """Every sparsity each layer can take: what the level database must hold."""
        out = {}
        for u, names in enumerate(self.layers):
            ss = [self.sparsity(u, v) for v in range(self.space.lo[u], self.space.hi[u] + 1)]
            for n in names:
                out[n] = [s for s in ss if s > 0]  # 0: the dense weight, always there
        return out

    def targets(self, genome: Genome) -> dict[str, float]:
        return {n: self.sparsity(u, v) for u, v in enumerate(genome) for n in self.layers[u]}

    def genome_of(self, targets: dict[str, float]) -> Genome:
        """The grid's genome nearest to a per-layer allocation (OWL, AlphaPruning), levels summing to
        zero: each unit at its nearest level, then steps taken from (given to) the units that were
        rounded up (down) the most."""
        want = []
        for u, names in enumerate(self.layers):
            s = sum(targets[n] * self.layer_numel[n] for n in names) / sum(self.layer_numel[n] for n in names)
            want.append((s - self.target) * self.numel[u] / self.delta)
        lo, hi = self.space.lo, self.space.hi
        g = [min(max(round(w), lo[u]), hi[u]) for u, w in enumerate(want)]
        while sum(g) != 0:
            up = sum(g) < 0
            movable = [u for u in range(len(g)) if (g[u] < hi[u] if up else g[u] > lo[u])]
            u = max(movable, key=lambda u: (want[u] - g[u]) if up else (g[u] - want[u]))
            g[u] += 1 if up else -1
        return tuple(g)


def level_grid(
    lm, target: float, *, step: float = 0.05, granularity: str = "layer", max_levels: int = 8
) -> LevelGrid:
    if not 0 < target < MAX_SPARSITY:
        raise LayerpruneError(
            f"--sparsity {target} cannot be searched: the levels must reach it within (0, {MAX_SPARSITY})"
        )
    if not 0 < step < 1:
        raise LayerpruneError(f"--levels {step} must be a step in (0, 1), e.g. 0.05")
    if granularity not in GRANULARITIES:
        raise LayerpruneError(f"unknown granularity '{granularity}'; use layer or block")
    if max_levels < 1:
        raise LayerpruneError("--max-levels must be at least 1")
    a = lm.adapter
    names = a.layer_names()
    layer_numel = {n: a.layer(n).weight.numel() for n in names}
    if granularity == "layer":
        units, layers = names, [[n] for n in names]
    else:
        units = [str(i) for i in range(a.num_blocks)]
        layers = [[n for n in names if n.split(".")[0] == b] for b in units]
    numel = [sum(layer_numel[n] for n in ls) for ls in layers]
    delta = step * statistics.median(numel)
    lo = tuple(-min(max_levels, math.floor(target * n / delta + 1e-9)) for n in numel)
    hi = tuple(min(max_levels, math.floor((MAX_SPARSITY - target) * n / delta + 1e-9)) for n in numel)
    return LevelGrid(target, granularity, units, layers, numel, delta, LevelSpace(lo, hi, 0), layer_numel)


def describe(grid: LevelGrid, fitness: str) -> str:
    """The task, for the LLM operators."""
    what = "linear layers" if grid.granularity == "layer" else "transformer blocks"
    return (
        f"prune a large language model to {grid.target} sparsity overall (the fraction of weights set to zero). "
        f"The units are its {len(grid.units)} {what}, in order: {', '.join(grid.units)}; their sizes in weights: "
        f"{grid.numel}. Unit u at level l gets sparsity {grid.target} + l * {grid.delta:.0f} / size_u, so levels "
        "summing to 0 keep the overall sparsity. Fitness: "
        + (
            "the KL divergence of the pruned model's next-token distribution to the dense model's"
            if fitness == "kl"
            else "the calibration NLL per token of the pruned model"
        )  # fmt: skip
        + ". Layers that matter more should get lower levels."
    )


def stage_windows(n: int, stages: int) -> list[int]:
    """Windows per selection stage: the last uses all n, each earlier one a quarter of the next."""
    return [max(1, n // 4 ** (stages - 1 - s)) for s in range(stages)]


class _Prefixed:
    """A view of an evaluation store whose keys carry a prefix (one store, several stages)."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix

    def get_many(self, keys):
        got = self.store.get_many(self.prefix + k for k in keys)
        return {k[len(self.prefix) :]: v for k, v in got.items()}

    def put(self, k: str, value: float, tokens: int) -> None:
        self.store.put(self.prefix + k, value, tokens)


class LevelFitness:
    """fitness(stage, genomes): KL to the dense model (or NLL) per token on the stage's windows."""

    def __init__(self, lm, grid: LevelGrid, db, windows, stages: list[int], *, kind: str = "kl",
                 store=None, batch_size: int = 8):  # fmt: skip
        if kind not in ("kl", "nll"):
            raise LayerpruneError(f"unknown fitness '{kind}'; use kl or nll")
        self.lm, self.grid, self.db, self.windows, self.stages = lm, grid, db, windows, stages
        self.kind, self.store, self.batch_size = kind, store, batch_size
        t0 = time.perf_counter()
        self.reference = None
        if kind == "kl":
            self.reference = DenseReference(lm.model, lm.adapter, windows.input_ids, batch_size=batch_size)
        self.reference_seconds = time.perf_counter() - t0
        self.evaluations = 0
        self.forward_seconds: list[float] = []  # each real evaluation's forward and KL: the overhead's base
        self.assign_seconds = 0.0  # copying the candidate's layers in from the database

    def tokens(self, stage: int) -> int:
        return self.stages[stage] * (self.windows.input_ids.shape[1] - 1)

    def __call__(self, stage: int, genomes: list[Genome]) -> list[float]:
        keys = [key(g) for g in genomes]
        by_key = dict(zip(keys, genomes))
        store = _Prefixed(self.store, f"s{self.stages[stage]}:lv:") if self.store is not None else None
        known = {k: v for k, (v, _) in store.get_many(keys).items()} if store is not None else {}

        def evaluate(share, on_value):
            out = []
            for k in share:
                out.append(self.total(by_key[k], stage))
                on_value(k, out[-1])
            return out

        def record(k, value):
            self.evaluations += 1
            if store is not None:
                store.put(k, value, self.tokens(stage))

        values = spread(keys, known, evaluate, record)
        return [values[k] / self.tokens(stage) for k in keys]

    def total(self, genome: Genome, stage: int) -> float:
        """Summed KL (or NLL) of one candidate over the stage's windows, evaluated for real."""
        t0 = time.perf_counter()
        targets = self.grid.targets(genome)
        self.db.assign(self.lm.adapter, {n: (s if s > 1e-12 else None) for n, s in targets.items()})
        self.assign_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        n = self.stages[stage]
        if self.reference is not None:
            value = self.reference.kl(self.lm.model, n)
        else:
            from ..data import Windows

            w = Windows(self.windows.input_ids[:n], self.windows.protocol)
            value = perplexity_of_windows(
                self.lm.model, self.lm.adapter, w, self.batch_size, progress=False
            ).nll
        self.forward_seconds.append(time.perf_counter() - t0)
        return value


def search_plan(lm, grid: LevelGrid, db, pruner: str, windows, fitness_windows, *, seeds: dict, fitness: str = "kl",
                generations: int = 50, offspring: int = 16, survivors=(4, 1), seed: int = 0, store=None,
                operators: str = "classic", llm=None, log: str | None = None, batch_size: int = 8,
                progress: bool = True):  # fmt: skip
    """The SparsityPlan of the best genome found; `seeds` name -> per-layer targets (uniform is added).
    The model's weights are back to dense when this returns."""
    from ..plans import SparsityPlan
    from ..provenance import stamp
    from ..scorers.run import model_info
    from .search import plot_history

    lm.adapter.require_in_memory("the sparsity search")
    db.restore(lm.adapter)  # the dense model: the reference of the KL, and the state assign() starts from
    stages = stage_windows(fitness_windows.input_ids.shape[0], len(survivors) + 1)
    named = {"uniform": (0,) * len(grid.units), **{n: grid.genome_of(t) for n, t in seeds.items()}}
    # the store's evaluations are of this database (model, pruner, its calibration and inputs) and grid
    m = db.manifest
    ident = [fitness_windows.fingerprint, m["model"], pruner, fitness, m.get("calibration"), m.get("inputs"),
             grid.delta, grid.granularity]  # fmt: skip
    data_fp = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if isinstance(store, (str, Path)):  # under torchrun rank 0 owns the store
            store = (
                stack.enter_context(
                    EvalStore(store, lm.fingerprint, data_fp, {"fitness": fitness}, lm.numerics_key)
                )
                if is_main()
                else None
            )
        stack.callback(db.restore, lm.adapter)
        fit = LevelFitness(
            lm, grid, db, fitness_windows, stages, kind=fitness, store=store, batch_size=batch_size
        )
        result = search_levels(grid.space, fit, seeds=named, generations=generations, offspring=offspring,
                               survivors=survivors, seed=seed, operators=operators, llm=llm,
                               describe=describe(grid, fitness), log_path=log, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - t0
    if log is not None and is_main():
        plot_history(result.history, Path(log).with_suffix(".png"), ylabel=f"fitness ({fitness} per token)",
                     title="EvoPress search of per-layer sparsity levels")  # fmt: skip
    layers = grid.targets(result.best)
    numel = {n: grid.layer_numel[n] for n in layers}
    achieved = sum(layers[n] * numel[n] for n in layers) / sum(numel.values())
    params = {
        "target": grid.target, "allocation": "search", "pruner": pruner, "nm": None,
        "granularity": grid.granularity, "level_step_weights": grid.delta, "fitness": fitness,
        "level_inputs": db.manifest.get("inputs", "dense"),
        "generations": generations, "offspring": offspring, "survivors": list(survivors), "operators": operators,
        "stage_windows": stages, "achieved": achieved,
    }  # fmt: skip
    extra = {
        "best_fitness": result.best_fitness,
        "start": result.seed_name,
        "seeds_fitness": result.seeds,
        "levels": list(result.best),
        "evaluations": result.evaluations,
        "evaluations_this_run": fit.evaluations,
        "search_seconds": seconds,
        "forward_seconds_total": sum(fit.forward_seconds),
        "assign_seconds_total": fit.assign_seconds,
        "dense_reference_seconds": fit.reference_seconds,
        "level_database": {
            "path": str(db.path),
            "kind": db.kind,
            "bytes": db.bytes,
            "layers_loaded": db.loads,
        },
        "fitness_calibration": fitness_windows.protocol,
        "history": result.history,
        **({"operator_stats": result.stats} if operators == "llm" else {}),
    }
    return SparsityPlan(
        model=model_info(lm), method="search", params=params, pruner=pruner, nm=None, layers=layers,
        calibration=windows.protocol if windows is not None else None, seed=seed, provenance=stamp(), extra=extra,
    )  # fmt: skip
