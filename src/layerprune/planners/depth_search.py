"""Depth by search (EvoPress): the set of K units to remove, searched by the level engine with levels
0 (kept) and 1 (removed) summing to K; a mutation swaps a removed unit for a kept one.

Fitness: calibration NLL per token without the set, through the mask evaluator (its trie shares the
hidden states of common prefixes) and an evaluation store (a killed search resumes); stage s of
the multi-step selection uses the first `stage_windows[s]` fitness windows. The default fitness is
32 windows of min(512, context) tokens in three stages (2 / 8 / 32 windows): on SmolLM2-135M the
depth papers' 16 x 128 ranked the removal sets unlike 128 held-out windows of 512 tokens (Spearman
0.89 over the five baselines' sets and the searched one at 6 blocks; 64 x 128 the same), 32 x 512
ranked them as held-out (0.94 at 6 blocks, 1.0 at 9), and the search on it beat every baseline at
9 blocks (0.947 x, where 16 x 128 gave 1.062 x); bench/results/search.json. The search starts from
the best of the removal sets that the given scores choose (the K least important allowed units of
ppl, bi, Shapley... scores), the sets of given depth plans (`plan --remove K` of any method, made
before: their units as they are), and optional random sets.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..distributed import is_main
from ..engine.masked import MaskEvaluator
from ..engine.store import EvalStore
from ..errors import LayerpruneError
from ..models.adapter import Unit
from ..scorers.base import Scores, protected_blocks
from .depth import _key
from .search.levels import LevelSearch, LevelSpace, search_levels
from .sparsity_search import _Prefixed, stage_windows

DEPTH_FITNESS_SAMPLES, DEPTH_FITNESS_SEQLEN = 32, 512  # the default fitness (seqlen: at most the context)


@dataclass
class DepthSearch(LevelSearch):
    """The options of `layerprune plan --remove K --allocation search` and their defaults."""

    unit: str = "block"
    protect: str | None = None
    seed_scores: tuple = ()  # more scores or depth plans (files or objects) whose removal sets seed the search
    survivors: tuple = (4, 1)
    random_initial: int = 0
    batch_size: int = 16


def seed_set(scores: Scores, remove: int, allowed: list[int]) -> tuple[int, ...]:
    """The K least important allowed units of the scores, as 0/1 levels."""
    imp = scores.importance
    chosen = set(sorted(allowed, key=lambda j: (_key(imp[j]), j))[:remove])
    return tuple(1 if j in chosen else 0 for j in range(len(imp)))


def plan_set(
    plan, lm, unit: str, units: list[Unit], allowed: list[int], remove: int, name: str
) -> tuple[int, ...]:
    """A depth plan's removal set as 0/1 levels over `units`, refused where the search cannot start
    from it: another model, another unit, another count, or a protected unit removed."""
    plan.check(lm, f"the seed plan {name}")
    if plan.unit != unit:
        raise LayerpruneError(
            f"the seed plan {name} removes {plan.unit} units; search with --unit {plan.unit} or give a plan of "
            f"{'attention / MLP' if plan.unit == 'block' else 'whole block'} units"
        )
    chosen = set(plan.units())
    if len(chosen) != remove:
        raise LayerpruneError(
            f"the seed plan {name} removes {len(chosen)} units, not {remove}; search with --remove {len(chosen)} "
            f"or give plans of {remove} units"
        )
    index = {u: j for j, u in enumerate(units)}
    missing = sorted(str(u) for u in chosen if u not in index)
    if missing:
        raise LayerpruneError(f"the seed plan {name} removes {missing}, not units of this search; re-make it")
    removable = set(allowed)
    protected = sorted(str(u) for u in chosen if index[u] not in removable)
    if protected:
        raise LayerpruneError(
            f"the seed plan {name} removes protected units {protected}; protect fewer (--protect) or drop that plan"
        )
    return tuple(1 if u in chosen else 0 for u in units)


def search_units(lm, remove: int, unit: str, protect) -> tuple[list[Unit], list[int], list[int]]:
    """The search's units, the protected blocks and the indices of the units it may remove."""
    if unit not in ("block", "module"):
        raise LayerpruneError(f"unknown unit '{unit}'; use block or module")
    units, L = lm.adapter.units(unit), lm.adapter.num_blocks
    if unit == "block" and remove >= L:
        raise LayerpruneError(
            f"cannot remove {remove} of {L} blocks; keep at least one (use --remove {L - 1} or less)"
        )
    protected = protected_blocks(protect, L, "search")
    allowed = [j for j, u in enumerate(units) if u.block not in protected]
    if remove > len(allowed):
        raise LayerpruneError(
            f"only {len(allowed)} units are not protected, fewer than the {remove} to remove; protect fewer or remove fewer"
        )
    return units, protected, allowed


def plan_sets(lm, plans: dict, remove: int, unit: str, protect) -> dict[str, tuple[int, ...]]:
    """Each seed plan's removal set as 0/1 levels; checked before anything is computed."""
    units, _, allowed = search_units(lm, remove, unit, protect)
    return {name: plan_set(p, lm, unit, units, allowed, remove, name) for name, p in plans.items()}


def search_plan(lm, remove: int, fitness_windows, *, unit: str = "block", seeds: dict[str, Scores] | None = None,
                seed_plans: dict | None = None,
                protect=None, generations: int = 50, offspring: int = 16, survivors=(4, 1), random_initial: int = 0,
                seed: int = 0, store=None, operators: str = "classic", llm=None, log: str | None = None,
                batch_size: int = 16, progress: bool = True):  # fmt: skip
    from ..plans import DepthPlan
    from ..provenance import stamp
    from ..scorers.run import model_info
    from .search import plot_history

    a = lm.adapter
    L = a.num_blocks
    units, protected, allowed = search_units(lm, remove, unit, protect)
    space = LevelSpace(
        tuple(0 for _ in units), tuple(1 if j in allowed else 0 for j in range(len(units))), remove
    )
    named = {}
    for name, s in (seeds or {}).items():
        s.require("depth", lm)
        if s.unit != unit:
            raise LayerpruneError(
                f"the {name} scores rank {s.unit} units, not {unit} units; score with --unit {unit}"
            )
        named[name] = seed_set(s, remove, allowed)
    for name, p in (seed_plans or {}).items():  # a plan named like a score seed keeps both
        named[name if name not in named else f"{name}-plan"] = plan_set(
            p, lm, unit, units, allowed, remove, name
        )
    if not named and not random_initial:
        random_initial = 8  # no scores to start from: the best of a few random sets
    stages = stage_windows(fitness_windows.input_ids.shape[0], len(survivors) + 1)
    evaluators = {}
    fitness_seconds = [0.0]  # inside the mask evaluator: the search's overhead is the rest
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if isinstance(store, (str, Path)):
            fw = fitness_windows
            store = (
                stack.enter_context(
                    EvalStore(store, lm.fingerprint, fw.fingerprint, fw.protocol, lm.numerics_key)
                )
                if is_main()
                else None
            )

        def fitness(stage: int, genomes):
            n = stages[stage]
            if n not in evaluators:
                view = _Prefixed(store, f"s{n}:") if store is not None else None
                evaluators[n] = MaskEvaluator(lm.model, a, fitness_windows.input_ids[:n], granularity=unit,
                                              store=view, batch_size=batch_size, progress=False)  # fmt: skip
            ev = evaluators[n]
            t = time.perf_counter()
            out = [v / ev.tokens for v in ev.nll([[1 - b for b in g] for g in genomes])]
            fitness_seconds[0] += time.perf_counter() - t
            return out

        task = (f"remove {remove} of the {len(units)} {unit} units of a language model of {L} blocks (units in "
                f"order: {', '.join(map(str, units))}). Fitness: the calibration NLL per token without them")  # fmt: skip
        result = search_levels(space, fitness, seeds=named, generations=generations, offspring=offspring,
                               survivors=survivors, random_initial=random_initial, seed=seed, operators=operators,
                               llm=llm, describe=task, as_set=True, log_path=log, progress=progress)  # fmt: skip
    seconds = time.perf_counter() - t0
    if log is not None and is_main():
        plot_history(result.history, Path(log).with_suffix(".png"), ylabel="fitness (calibration NLL per token)",
                     title="EvoPress search of the units to remove")  # fmt: skip
    removed = [str(units[j]) for j, b in enumerate(result.best) if b]
    return DepthPlan(
        model=model_info(lm),
        method="search",
        unit=unit,
        remove=sorted(removed, key=Unit.parse),
        params={
            "remove": remove,
            "ratio": None,
            "iterative": False,
            "protected": protected,
            "generations": generations,
            "offspring": offspring,
            "survivors": list(survivors),
            "stage_windows": stages,
            "random_initial": random_initial,
            "seeds": sorted(named),
        },  # fmt: skip
        calibration=fitness_windows.protocol,
        seed=seed,
        provenance=stamp(),
        extra={
            "best_fitness": result.best_fitness,
            "calibration_ppl": math.exp(result.best_fitness),
            "start": result.seed_name,
            "seeds_fitness": result.seeds,
            "evaluations": result.evaluations,
            "evaluations_this_run": sum(e.evaluations for e in evaluators.values()),
            "search_seconds": seconds,
            "fitness_seconds_total": fitness_seconds[0],
            "history": result.history,
            **({"operator_stats": result.stats} if operators == "llm" else {}),
        },
    )
