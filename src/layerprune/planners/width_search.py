"""The width search's fitness and driver (Self-Pruner): calibration perplexity of the model under the
structured mask of each candidate rate vector, evaluated in place through the evaluation store.

The allocation rules that seed the population are in planners/width.py, which calls `search_rates`.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from pathlib import Path

from ..data import calibration
from ..distributed import is_main, spread
from ..engine.store import EvalStore
from ..evaluation.perplexity import perplexity_of_windows
from ..models.width import masked
from ..models.width_decisions import budgets, counts, masks_for
from .search import DEFAULT_P_MAX, DEFAULT_P_MIN, plot_history, search


def decision_key(decision: list[tuple[int, int]]) -> str:
    """The store key of a structured mask: what is removed, block by block."""
    return "w:" + json.dumps(decision, separators=(",", ":"))


class Fitness:
    """Calibration perplexity of the model under the structured mask of a rate vector, in place,
    through an evaluation store when one is given (a killed search resumes without re-evaluating)."""

    def __init__(self, lm, table: dict, windows, *, store=None, batch_size: int = 16, decide=None):
        self.lm, self.table, self.windows = lm, table, windows
        self.blocks = budgets(lm.adapter)
        # rates -> (groups, channels) removed per block; a deployable search snaps to what the format carries
        self.decide = decide or (lambda rates: counts(rates, self.blocks))
        self.store, self.batch_size = store, batch_size
        self.tokens = int(windows.input_ids.shape[0] * (windows.input_ids.shape[1] - 1))
        self.evaluations = 0  # real evaluations in this run (all ranks' under torchrun)
        self.forward_seconds: list[float] = []  # each real evaluation's masked forward, for overhead figures

    def key(self, rates: list[float]) -> str:
        return decision_key(self.decide(rates))

    def __call__(self, batch: list[list[float]]) -> list[float]:
        """Perplexity of each candidate; under torchrun the candidates that rank 0's store lacks are
        spread over the ranks (see layerprune.distributed), and only rank 0 has a store."""
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
        masks = masks_for(self.decide(rates), self.table)
        t0 = time.perf_counter()
        # FLAP scores: removed features read their calibration mean (the bias compensation)
        with masked(self.lm.adapter, masks, self.table.get("means")):
            r = perplexity_of_windows(
                self.lm.model, self.lm.adapter, self.windows, self.batch_size, progress=False
            )
        self.forward_seconds.append(time.perf_counter() - t0)
        return r.nll


def fitness_calibration(lm, windows, samples: int | None = None, seqlen: int | None = None):
    """The search's fitness windows: the depth papers' sizes (10 x 128) unless given, drawn from
    the text, seed and BOS policy that `windows` (the structured scores' calibration) came from."""
    source = seed = bos = None
    if windows is not None:
        p = windows.protocol
        source, seed, bos = p.get("dataset"), p.get("seed", 0), p.get("bos")
    return calibration(lm, source, samples=samples, seqlen=seqlen, seed=seed or 0, bos=bos, kind="depth")


def search_rates(lm, width, table, blocks, fitness_windows, *, seeds, store, operators, llm, population,
                 crossovers, mutations, iterations, seed, p_min, p_max, log, batch_size, progress, decide=None):  # fmt: skip
    """Self-Pruner's search of per-block rates with mean `width`, seeded with `seeds` (name -> rates);
    the best rates and what the plan records of the search."""
    fw = fitness_windows
    with contextlib.ExitStack() as stack:
        if isinstance(store, (str, Path)):  # under torchrun rank 0 owns the store
            store = (
                stack.enter_context(
                    EvalStore(store, lm.fingerprint, fw.fingerprint, fw.protocol, lm.numerics_key)
                )
                if is_main()
                else None
            )
        fitness = Fitness(lm, table, fw, store=store, batch_size=batch_size, decide=decide)
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
