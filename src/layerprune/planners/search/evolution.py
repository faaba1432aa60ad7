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

The parts: the constraint on a genome (`constraint.py`: bounds, `repair`), the classic operators
(`operators.py`), the LLM operators (`llm.py`), a run's population (`population.py`); this module
is the loop.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...errors import LayerpruneError
from ...plotting import pyplot, save_figure
from .constraint import DEFAULT_P_MAX, DEFAULT_P_MIN, Rates, _weights, check_bounds
from .llm import as_config
from .operators import _rank
from .population import (
    Candidate,
    Population,
    SearchResult,
    _is_finite_number,
    _json_number,
    _survivors,
)


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
        run = Population(
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


def plot_history(
    history: Sequence[Mapping],
    path: str | Path,
    ylabel: str = "fitness (calibration perplexity, lower is better)",
    title: str = "evolutionary search of per-block pruning rates",
) -> Path | None:
    """PNG of the best and median fitness per generation; None when matplotlib is missing."""
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
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
