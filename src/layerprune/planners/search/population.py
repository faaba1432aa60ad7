"""The population of one search run: candidates, the keys already seen, the operators that make
new ones (classic or LLM), and their evaluation in batches. evolution.py runs the generations."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...errors import LayerpruneError
from .constraint import Rates
from .llm import STATS as LLM_STATS
from .llm import LLMOperators
from .operators import ClassicOperators, _rank

MAX_TRIES = 50  # attempts at a child whose key is new before the child is dropped


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


class Population:
    """One run's candidates: keys already seen, the operators, the evaluation of new candidates."""

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
