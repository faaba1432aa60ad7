"""Evolutionary search over per-block structured pruning rates (the search of Self-Pruner), model-agnostic.

A genome is a vector of L rates, one per block, each in [p_min, p_max], whose parameter-weighted mean
is the target beta (`repair` enforces both). The search knows nothing about models: the caller gives

- `evaluate(list_of_rates) -> list_of_fitness`, a batch (LOWER is better: calibration perplexity of
  the model pruned at those rates). It may be backed by a persistent store and skip stored candidates;
- `key(rates) -> str`, the discrete decision the rates map to: two genomes with the same key are the
  same candidate, and no key is evaluated twice in a run.

Operators (`operators="classic"`): tournament selection (size 3) on fitness; crossover = uniform or
BLX-0.5 blend, chosen at random; Gaussian mutation (sigma 0.05) of a random subset of genes; every
child repaired. The initial population is the uniform allocation (all = beta), the caller's seeded
allocations (e.g. OWL, AlphaPruning) and random Dirichlet perturbations around beta, deduplicated.
With `operators="llm"` a chat model proposes the initial population, the parents and the children
(see `llm.py`); whatever it gets wrong is repaired or replaced by the classic operator, and counted.

Survivor selection is elitist: the best `population` of parents + children. The run is deterministic
given the seed and the fitness values: the random stream never depends on timing or on whether a
fitness came from a store, so a killed run re-run with the same seed over the same store replays the
same candidates, evaluates for real only those the store lacks, and ends with the same result.

Bounds: p_min = 0 lets the search leave a sensitive block (often the first ones) unpruned; p_max = 0.9
keeps at least 10% of every block's structures, so no block is emptied (removing a whole block is a
depth decision, another planner's job) while leaving room for targets up to 0.9.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import LayerpruneError

DEFAULT_P_MIN = 0.0
DEFAULT_P_MAX = 0.9
TOURNAMENT_SIZE = 3
BLEND_ALPHA = 0.5
MUTATION_SIGMA = 0.05
MUTATION_FRACTION = 0.25  # each gene mutated with this probability (at least one per child)
MAX_TRIES = 50  # attempts at a child whose key is new before the child is dropped
TOLERANCE = 1e-9

Rates = list[float]


# ----------------------------------------------------------------------------------------------- repair


def check_bounds(beta: float, p_min: float, p_max: float) -> None:
    """Raise LayerpruneError naming the fix when no rate vector within [p_min, p_max] has mean beta."""
    for name, v in (("target rate", beta), ("--p-min", p_min), ("--p-max", p_max)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise LayerpruneError(f"{name} {v!r} must be a finite number")
    if not 0 < beta < 1:
        raise LayerpruneError(f"the target rate {beta} must be in (0, 1), e.g. 0.3 for 30% of the weights")
    if not (0 <= p_min < 1 and 0 <= p_max < 1):
        raise LayerpruneError(
            f"the bounds --p-min {p_min} and --p-max {p_max} must lie in [0, 1) "
            f"(defaults {DEFAULT_P_MIN} and {DEFAULT_P_MAX})"
        )
    if p_min > p_max:
        raise LayerpruneError(f"--p-min {p_min} is above --p-max {p_max}; swap them")
    if beta < p_min:
        raise LayerpruneError(
            f"the target rate {beta} is below --p-min {p_min}: no allocation within the bounds reaches it; "
            f"use --p-min {beta} or less"
        )
    if beta > p_max:
        raise LayerpruneError(
            f"the target rate {beta} is above --p-max {p_max}: no allocation within the bounds reaches it; "
            f"use --p-max {beta} or more (below 1), or a lower target"
        )


def _weights(weights: Sequence[float], L: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or len(w) != L:
        raise LayerpruneError(
            f"{len(np.atleast_1d(w))} block weights for {L} blocks; give one weight per block"
        )
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise LayerpruneError("block weights (parameters per block) must be finite and positive")
    return w / w.sum()


def repair(
    rates: Sequence[float],
    beta: float,
    weights: Sequence[float],
    p_min: float = DEFAULT_P_MIN,
    p_max: float = DEFAULT_P_MAX,
) -> Rates:
    """Clip to [p_min, p_max], then move the rates until their weighted mean is beta (to 1e-9).

    The residual is spread over the entries that can still move in its direction, proportionally to
    their headroom (p_max - r when raising, r - p_min when lowering): one step is exact in exact
    arithmetic and never leaves the bounds; a few more absorb rounding.
    """
    check_bounds(beta, p_min, p_max)
    x = np.asarray(rates, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise LayerpruneError("rates must be a non-empty list of numbers, one per block")
    if not np.all(np.isfinite(x)):
        raise LayerpruneError("rates must be finite numbers")
    w = _weights(weights, len(x))
    x = np.clip(x, p_min, p_max)
    for _ in range(100):
        residual = beta - float(w @ x)
        if abs(residual) <= 1e-15:
            break
        headroom = (p_max - x) if residual > 0 else (x - p_min)
        capacity = float(w @ headroom)
        if capacity <= 0:
            break
        x = np.clip(x + math.copysign(min(1.0, abs(residual) / capacity), residual) * headroom, p_min, p_max)
    if abs(beta - float(w @ x)) > TOLERANCE:  # cannot happen once check_bounds passed; kept as a guard
        raise LayerpruneError(f"could not bring the rates to mean {beta} within [{p_min}, {p_max}]")
    return [float(v) for v in x]


def weighted_mean(rates: Sequence[float], weights: Sequence[float]) -> float:
    w = np.asarray(weights, dtype=float)
    return float(np.asarray(rates, dtype=float) @ w / w.sum())


# -------------------------------------------------------------------------------------- classic operators


def _rank(value: float | None) -> float:
    """Fitness as a sort key: lower is better, anything not a finite number is worst."""
    return value if value is not None and math.isfinite(value) else math.inf


class ClassicOperators:
    """Tournament selection, uniform / BLX-alpha crossover, Gaussian mutation, Dirichlet initialisation.
    Every child is repaired; all randomness comes from the one generator given."""

    def __init__(
        self,
        rng: np.random.Generator,
        beta: float,
        weights: Sequence[float],
        p_min: float = DEFAULT_P_MIN,
        p_max: float = DEFAULT_P_MAX,
    ):
        self.rng, self.beta, self.weights, self.p_min, self.p_max = rng, beta, list(weights), p_min, p_max
        self.L = len(self.weights)

    def repair(self, rates) -> Rates:
        return repair(rates, self.beta, self.weights, self.p_min, self.p_max)

    def tournament(self, fitness: Sequence[float | None], size: int = TOURNAMENT_SIZE) -> int:
        picks = self.rng.integers(0, len(fitness), size=size)
        return int(min(picks, key=lambda i: (_rank(fitness[i]), i)))

    def pair(self, fitness: Sequence[float | None]) -> tuple[int, int]:
        i = self.tournament(fitness)
        j = self.tournament(fitness)
        for _ in range(5):  # two distinct parents when the population allows it
            if j != i or len(fitness) < 2:
                break
            j = self.tournament(fitness)
        return i, j

    def crossover(self, a: Sequence[float], b: Sequence[float]) -> tuple[Rates, str]:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if self.rng.random() < 0.5:
            child = np.where(self.rng.random(self.L) < 0.5, a, b)
            return self.repair(child), "crossover:uniform"
        spread = np.abs(a - b) * BLEND_ALPHA
        child = self.rng.uniform(np.minimum(a, b) - spread, np.maximum(a, b) + spread)
        return self.repair(child), "crossover:blend"

    def mutate(self, a: Sequence[float]) -> Rates:
        mask = self.rng.random(self.L) < MUTATION_FRACTION
        if not mask.any():
            mask[self.rng.integers(self.L)] = True
        noise = self.rng.normal(0.0, MUTATION_SIGMA, self.L)
        return self.repair(np.asarray(a, dtype=float) + mask * noise)

    def random_member(self) -> Rates:
        """beta * L * Dirichlet(c): mean beta, spread about beta / sqrt(c), c log-uniform in [4, 100]."""
        c = math.exp(self.rng.uniform(math.log(4.0), math.log(100.0)))
        return self.repair(self.beta * self.L * self.rng.dirichlet(np.full(self.L, c)))


# ------------------------------------------------------------------------------------------------- driver


@dataclass
class Candidate:
    rates: Rates
    key: str
    operator: str
    parents: list[str] = field(default_factory=list)  # keys of the parents
    fitness: float | None = None
    fallback: str | None = None  # why an LLM proposal was replaced by the classic operator

    def record(self) -> dict:
        d = asdict(self)
        d["fitness"] = _json_number(self.fitness)
        if self.fallback is None:
            del d["fallback"]
        return d


@dataclass
class SearchResult:
    best_rates: Rates
    best_fitness: float
    best_key: str
    history: list[dict]  # one per generation: generation, best/median fitness, evaluations, stats
    stats: dict[str, int]  # operator events over the run
    evaluations: int  # candidates sent to `evaluate` (each key once)
    population: list[dict]  # the final population, best first: rates, key, fitness, operator, parents

    def to_dict(self) -> dict:
        return asdict(self)


def _is_finite_number(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
    )


def _json_number(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


CLASSIC_STATS = ("duplicate_retry", "duplicate_dropped", "init_duplicate")


class _Run:
    def __init__(self, L, beta, weights, evaluate, key, *, p_min, p_max, seed, operators, llm, bar, log):
        self.L, self.beta, self.weights, self.p_min, self.p_max = L, beta, list(weights), p_min, p_max
        self.evaluate_fn, self.key_fn = evaluate, key
        self.rng = np.random.default_rng(seed)
        self.ops = ClassicOperators(self.rng, beta, self.weights, p_min, p_max)
        self.stats: Counter = Counter({k: 0 for k in CLASSIC_STATS})
        self.seen: set[str] = set()
        self.evaluations = 0
        self.bar, self.log = bar, log
        self.llm = None
        if operators == "llm":
            from .llm import STATS as LLM_STATS
            from .llm import LLMOperators

            self.stats.update({k: 0 for k in LLM_STATS})
            self.llm = LLMOperators(
                llm, L=L, beta=beta, weights=self.weights, p_min=p_min, p_max=p_max, stats=self.stats
            )

    def key(self, rates: Rates) -> str:
        k = self.key_fn(list(rates))
        if not isinstance(k, str):
            raise LayerpruneError(f"key(rates) must return a str, got {type(k).__name__}")
        return k

    def fresh(self, make: Callable[[int], tuple[Rates, str, list[str]]]) -> Candidate | None:
        """A candidate whose key is new (make(attempt) -> rates, operator, parent keys), or None."""
        for attempt in range(MAX_TRIES):
            rates, operator, parents = make(attempt)
            k = self.key(rates)
            if k not in self.seen:
                self.seen.add(k)
                return Candidate(rates, k, operator, parents)
            self.stats["duplicate_retry"] += 1
        self.stats["duplicate_dropped"] += 1
        return None

    def accept(self, rates: Rates | None, operator: str, parents: list[str]) -> Candidate | None:
        """An LLM proposal (already validated and repaired, None if invalid), if its key is new."""
        if rates is None:
            return None
        k = self.key(rates)
        if k in self.seen:
            self.stats["duplicate_replaced"] += 1
            return None
        self.seen.add(k)
        self.stats["llm_children"] += 1
        return Candidate(rates, k, operator, parents)

    def evaluate(self, cands: list[Candidate]) -> None:
        if not cands:
            return
        values = list(self.evaluate_fn([list(c.rates) for c in cands]))
        if len(values) != len(cands):
            raise LayerpruneError(
                f"evaluate returned {len(values)} fitness values for {len(cands)} candidates"
            )
        for c, v in zip(cands, values):
            try:
                c.fitness = float(v)
            except (TypeError, ValueError):
                raise LayerpruneError(
                    f"evaluate returned {v!r}, not a number, for candidate {c.key}"
                ) from None
        self.evaluations += len(cands)
        self.bar.update(len(cands))

    # --- generation 0

    def initial(self, population: int, seeds: Mapping[str, Sequence[float]]) -> list[Candidate]:
        cands: list[Candidate] = []

        def add(rates: Rates, operator: str) -> None:
            k = self.key(rates)
            if k in self.seen:
                self.stats["init_duplicate"] += 1
                return
            self.seen.add(k)
            cands.append(Candidate(rates, k, operator))

        add(self.ops.repair([self.beta] * self.L), "uniform")
        for name, rates in seeds.items():
            add(self.ops.repair(rates), f"seed:{name}")
        missing = max(0, population - len(cands))
        proposals = self.llm.initial(missing, seeds) if self.llm is not None and missing else []
        for i in range(missing):
            rates, reason = proposals[i] if i < len(proposals) else (None, None)
            child = self.accept(rates, "llm:init", []) if self.llm is not None else None
            if child is None:
                child = self.fresh(lambda _a: (self.ops.random_member(), "random", []))
                if child is not None and self.llm is not None:
                    self.stats["classic_fallback"] += 1
                    child.fallback = reason or "duplicate"
            if child is None:
                break  # the key space is exhausted around beta; start with a smaller population
            cands.append(child)
        return cands

    # --- one generation

    def children(self, pop: list[Candidate], crossovers: int, mutations: int) -> list[Candidate]:
        fitness = [c.fitness for c in pop]
        pairs: list[tuple[int, int] | None] = [None] * crossovers
        mutants: list[int | None] = [None] * mutations
        if self.llm is not None:
            pairs, mutants = self.llm.select(pop, crossovers, mutations)
        pairs = [p if p is not None else self.ops.pair(fitness) for p in pairs]
        mutants = [m if m is not None else self.ops.tournament(fitness) for m in mutants]

        def crossover_maker(i: int, j: int):
            def make(attempt: int):
                a, b = (i, j) if attempt == 0 else self.ops.pair(fitness)
                rates, op = self.ops.crossover(pop[a].rates, pop[b].rates)
                return rates, op, [pop[a].key, pop[b].key]

            return make

        def mutation_maker(i: int):
            def make(attempt: int):
                a = i if attempt == 0 else self.ops.tournament(fitness)
                return self.ops.mutate(pop[a].rates), "mutation", [pop[a].key]

            return make

        out: list[Candidate] = []
        jobs = [("crossover", p, crossover_maker(*p)) for p in pairs]
        jobs += [("mutation", (m,), mutation_maker(m)) for m in mutants]
        proposals: list[tuple[Rates | None, str | None]] = [(None, None)] * len(jobs)
        if self.llm is not None:
            proposals = self.llm.crossover(pop, pairs) + self.llm.mutate(pop, mutants)
        for (kind, parents, make), (rates, reason) in zip(jobs, proposals):
            child = None
            if self.llm is not None:
                child = self.accept(rates, f"llm:{kind}", [pop[i].key for i in parents])
            if child is None:
                child = self.fresh(make)
                if child is not None and self.llm is not None:
                    self.stats["classic_fallback"] += 1
                    child.fallback = reason or "duplicate"
            if child is not None:
                out.append(child)
        return out


def _survivors(cands: list[Candidate], population: int) -> list[Candidate]:
    order = sorted(range(len(cands)), key=lambda i: (_rank(cands[i].fitness), i))
    return [cands[i] for i in order[:population]]


def _summary(generation: int, pop: list[Candidate], new: int, total: int, stats: dict) -> dict:
    ranks = [_rank(c.fitness) for c in pop]
    return {
        "generation": generation,
        "best_fitness": _json_number(ranks[0]) if ranks else None,
        "median_fitness": _json_number(statistics.median(ranks)) if ranks else None,
        "evaluations": new,
        "total_evaluations": total,
        "stats": stats,
    }


def search(
    L: int,
    beta: float,
    weights: Sequence[float],
    evaluate: Callable[[list[Rates]], Sequence[float]],
    key: Callable[[Rates], str],
    *,
    p_min: float = DEFAULT_P_MIN,
    p_max: float = DEFAULT_P_MAX,
    population: int = 30,
    crossovers: int = 10,
    mutations: int = 10,
    iterations: int = 20,
    seed: int = 0,
    seeds: Mapping[str, Sequence[float]] | None = None,
    operators: str = "classic",
    llm: Any = None,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search per-block rates (weighted mean beta, within [p_min, p_max]) minimising `evaluate`.

    `evaluate(batch_of_rates) -> fitness per rates` (lower is better); `key(rates) -> str` identifies
    the candidate (no key is evaluated twice); `seeds` are named allocations put in the initial
    population (repaired); `llm` is an `LLMConfig` when operators="llm". Every generation is appended
    to the JSONL `log_path` (flushed). About population + iterations * (crossovers + mutations)
    evaluations (430 with the defaults).
    """
    from tqdm.auto import tqdm

    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise LayerpruneError(f"the number of blocks L must be a positive integer, got {L!r}")
    check_bounds(beta, p_min, p_max)
    _weights(weights, L)
    for name, v, low in (
        ("population", population, 1),
        ("crossovers", crossovers, 0),
        ("mutations", mutations, 0),
        ("iterations", iterations, 0),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise LayerpruneError(f"--{name} {v!r} must be an integer >= {low}")
    if operators not in ("classic", "llm"):
        raise LayerpruneError(f"--operators {operators!r}: use classic or llm")
    if operators == "llm" and llm is None:
        raise LayerpruneError("--operators llm needs an endpoint and a model: give --llm-url and --llm-model")
    if operators == "llm":
        from .llm import as_config

        llm = as_config(llm)
    seeds = dict(seeds or {})
    for name, rates in seeds.items():
        if len(rates) != L:
            raise LayerpruneError(
                f"seed allocation {name!r} has {len(rates)} rates for {L} blocks; give one per block"
            )
        if not all(_is_finite_number(r) for r in rates):
            raise LayerpruneError(f"seed allocation {name!r} holds something other than finite numbers")
    config = {
        "L": L,
        "beta": beta,
        "weights": [float(w) for w in weights],
        "p_min": p_min,
        "p_max": p_max,
        "population": population,
        "crossovers": crossovers,
        "mutations": mutations,
        "iterations": iterations,
        "seed": seed,
        "seeds": {k: [float(r) for r in v] for k, v in seeds.items()},
        "operators": operators,
        "llm": asdict(llm)
        if operators == "llm"
        else None,  # url, model, key_env (the name, never the key)...
    }
    from ...distributed import is_main

    log = None
    if log_path is not None and is_main():  # under torchrun rank 0 owns every output file
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a", encoding="utf-8")

    def write(line: dict) -> None:
        if log is not None:
            log.write(json.dumps(line, allow_nan=False) + "\n")
            log.flush()

    bar = tqdm(
        total=population + iterations * (crossovers + mutations),
        desc="search",
        unit="eval",
        disable=not progress,
        leave=False,
    )
    try:
        run = _Run(
            L,
            beta,
            weights,
            evaluate,
            key,
            p_min=p_min,
            p_max=p_max,
            seed=seed,
            operators=operators,
            llm=llm,
            bar=bar,
            log=log,
        )
        write({"event": "start", "config": config})
        history: list[dict] = []

        def generation(g: int, pop: list[Candidate], children: list[Candidate], before: Counter) -> None:
            delta = {k: run.stats[k] - before.get(k, 0) for k in run.stats}
            entry = _summary(g, pop, len(children), run.evaluations, delta)
            history.append(entry)
            line = {"event": "generation", **entry, "operators": operators}
            line["population"] = [c.record() for c in pop]
            line["children"] = [c.record() for c in children]
            if run.llm is not None:
                line["llm_replies"] = run.llm.drain_transcript()
            write(line)
            if pop:
                bar.set_postfix(best=f"{_rank(pop[0].fitness):.4g}", refresh=False)

        before = Counter(run.stats)
        first = run.initial(population, seeds)
        run.evaluate(first)
        pop = _survivors(first, population)
        generation(0, pop, first, before)
        for g in range(1, iterations + 1):
            before = Counter(run.stats)
            kids = run.children(pop, crossovers, mutations)
            run.evaluate(kids)
            pop = _survivors(pop + kids, population)
            generation(g, pop, kids, before)
        best = pop[0]
        result = SearchResult(
            best_rates=list(best.rates),
            best_fitness=float(best.fitness),
            best_key=best.key,
            history=history,
            stats=dict(run.stats),
            evaluations=run.evaluations,
            population=[c.record() for c in pop],
        )
        write(
            {
                "event": "end",
                "best_rates": result.best_rates,
                "best_fitness": _json_number(result.best_fitness),
                "best_key": result.best_key,
                "evaluations": result.evaluations,
                "stats": result.stats,
            }
        )
        return result
    finally:
        bar.close()
        if log is not None:
            log.close()


# --------------------------------------------------------------------------------------------------- plot


def plot_history(history: Sequence[Mapping], path: str | Path) -> Path | None:
    """PNG of the best and median fitness per generation; None when matplotlib is missing."""
    from ...reports.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    path = Path(path)
    gens = [h["generation"] for h in history]
    nan = float("nan")
    best = [nan if h.get("best_fitness") is None else h["best_fitness"] for h in history]
    median = [nan if h.get("median_fitness") is None else h["median_fitness"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(gens, best, marker="o", ms=3, label="best")
    ax.plot(gens, median, marker="o", ms=3, ls="--", label="median")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (calibration perplexity, lower is better)")
    ax.set_title("evolutionary search of per-block pruning rates", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
