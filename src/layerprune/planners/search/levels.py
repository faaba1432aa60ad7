"""Evolutionary search over discrete levels, one per unit, with a fixed sum (EvoPress), model-agnostic.

A genome is one integer level per unit, each in [lo_u, hi_u], whose sum is `total`:
- per-layer sparsity: level l of a layer is the target sparsity plus l steps of a fixed number of
  weights (the same count for every layer), and the levels sum to 0, so every genome removes exactly
  the target's number of weights however the layers differ in size;
- depth: a level is 1 (removed) or 0 (kept), the sum is the number of units to remove, protected
  units have hi = 0.

The search is EvoPress's (1 + lambda): every generation the parent makes `offspring` children by
`min(randint(1, 3), randint(1, 3))` level switches (one unit one level down, another one level up,
so the sum is kept); the children go through a multi-step selection (stage s evaluates the
survivors of stage s-1 on more tokens and keeps `survivors[s]` of them), and the parent joins the
last stage, which it must lose to be replaced. Children equal to the parent or to another child are
drawn again. The initial parent is the best of the caller's seeds (e.g. uniform sparsity, OWL and
AlphaPruning allocations, or the removal orders of ppl / bi / Shapley scores), plus `random`
random genomes, on the last stage.

`fitness(stage, genomes) -> values` (LOWER is better) is the caller's: KL divergence to the dense
model, or calibration perplexity, on the stage's tokens. The random stream depends on nothing but
the seed and the fitness values, so a killed run repeated over the same evaluation store replays
the same genomes, evaluates for real only those the store lacks, and ends with the same result.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import LayerpruneError

Genome = tuple[int, ...]
MAX_FLIPS = 3  # level switches per child: min of two uniform draws in 1..MAX_FLIPS, as EvoPress
MAX_TRIES = 100  # draws of a child that is new in its generation before it is given up


@dataclass(frozen=True)
class LevelSpace:
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    total: int

    def __post_init__(self):
        if len(self.lo) != len(self.hi) or not self.lo:
            raise LayerpruneError("a level space needs one (lo, hi) pair per unit")
        if any(a > b for a, b in zip(self.lo, self.hi)):
            raise LayerpruneError("a unit's lowest level is above its highest")
        if not sum(self.lo) <= self.total <= sum(self.hi):
            raise LayerpruneError(
                f"the levels cannot sum to {self.total}: the units reach {sum(self.lo)} .. {sum(self.hi)}"
            )

    @property
    def units(self) -> int:
        return len(self.lo)

    def check(self, genome: Sequence[int], what: str = "genome") -> Genome:
        g = tuple(int(v) for v in genome)
        if len(g) != self.units:
            raise LayerpruneError(f"{what} has {len(g)} levels for {self.units} units")
        bad = [u for u, v in enumerate(g) if not self.lo[u] <= v <= self.hi[u]]
        if bad:
            raise LayerpruneError(f"{what}: units {bad[:5]} are outside their levels")
        if sum(g) != self.total:
            raise LayerpruneError(f"{what}: levels sum to {sum(g)}, not {self.total}")
        return g

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        """`min(randint(1, 3), randint(1, 3))` switches: a unit that can go down goes one level down,
        one that can go up goes one level up (drawn after the first moved; possibly the same unit)."""
        g = list(genome)
        flips = min(rng.randint(1, MAX_FLIPS), rng.randint(1, MAX_FLIPS))
        for _ in range(flips):
            down = [u for u in range(self.units) if g[u] > self.lo[u]]
            if not down:
                break
            g[rng.choice(down)] -= 1
            up = [u for u in range(self.units) if g[u] < self.hi[u]]
            g[rng.choice(up)] += 1  # not empty: the sum is below sum(hi) after the step down
        return tuple(g)

    def random(self, rng: random.Random) -> Genome:
        """A random genome: from the lowest levels, one level up at a time on random units."""
        g = list(self.lo)
        for _ in range(self.total - sum(self.lo)):
            up = [u for u in range(self.units) if g[u] < self.hi[u]]
            g[rng.choice(up)] += 1
        return tuple(g)


@dataclass
class LevelSearch:
    """The options both level searches take (sparsity_search.SparsitySearch, depth_search.DepthSearch)."""

    allocation: str = "search"
    fitness_samples: int | None = None  # default 16 windows
    fitness_seqlen: int | None = None  # default 128 tokens
    generations: int = 50
    offspring: int = 16
    survivors: tuple = (4, 1)  # children kept after each selection stage but the last
    operators: str = "classic"
    llm: object = None  # an LLMConfig for operators="llm"
    seed: int = 0
    store: str | None = None
    log: str | None = None
    batch_size: int = 8


def key(genome: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in genome)


@dataclass
class LevelResult:
    best: Genome
    best_fitness: float
    seed_name: str  # the seed the search started from
    history: list[dict] = field(default_factory=list)
    evaluations: int = 0  # fitness values computed, stored ones included
    seeds: dict = field(default_factory=dict)  # name -> last-stage fitness of each seed
    stats: dict = field(default_factory=dict)  # the LLM operators' counts (llm_levels.py)


def check_request(generations: int, offspring: int, survivors: Sequence[int], operators: str, llm) -> None:
    """What a level search refuses before any work: its sizes and its operators."""
    if generations < 0 or offspring < 1:
        raise LayerpruneError("give at least one offspring per generation and zero or more generations")
    if any(int(k) < 1 for k in survivors) or list(survivors) != sorted(survivors, reverse=True):
        raise LayerpruneError(f"--survivors {list(survivors)} must be positive and not increase, e.g. 4,1")
    if survivors and survivors[0] > offspring:
        raise LayerpruneError(
            f"{survivors[0]} survivors of the first stage need at least as many --offspring"
        )
    if operators == "llm" and llm is None:
        raise LayerpruneError("--operators llm needs --llm-url and --llm-model (or use --operators classic)")
    if operators not in ("classic", "llm"):
        raise LayerpruneError(f"--operators '{operators}': use classic or llm")
    if operators == "llm":  # an endpoint that is down fails now, not after the level database is built
        from .llm import check_endpoint

        check_endpoint(llm)


def search_levels(
    space: LevelSpace,
    fitness: Callable[[int, list[Genome]], Sequence[float]],
    *,
    seeds: Mapping[str, Sequence[int]],
    generations: int = 50,
    offspring: int = 16,
    survivors: Sequence[int] = (4, 1),
    random_initial: int = 0,
    seed: int = 0,
    operators: str = "classic",
    llm=None,
    describe: str = "",
    as_set: bool = False,
    log_path: str | Path | None = None,
    progress: bool = True,
) -> LevelResult:
    """(1 + offspring) evolution with multi-step selection; `survivors[s]` children leave stage s,
    and there is one stage more than `survivors` lists: stage len(survivors) is the last, where
    the parent competes (its `survivors` entry is implicitly 1). `operators="llm"`: the chat model
    of `llm` (an LLMConfig) proposes the children (llm_levels.py), told the task by `describe`;
    `as_set`: it sees a genome as the set of units at level 1 (depth)."""
    from tqdm.auto import tqdm

    check_request(generations, offspring, survivors, operators, llm)
    stages = len(survivors) + 1
    stats: Counter = Counter()
    llm_ops = None
    if operators == "llm":
        from .llm_levels import LevelLLM

        llm_ops = LevelLLM(llm, space, describe=describe, as_set=as_set, stats=stats)
    rng = random.Random(seed)
    named = {name: space.check(g, f"seed '{name}'") for name, g in seeds.items()}
    for j in range(random_initial):
        named[f"random{j}"] = space.random(rng)
    if not named:
        raise LayerpruneError("the search needs at least one seed genome")
    cache: dict[tuple[int, Genome], float] = {}
    counted = [0]

    def values(stage: int, genomes: list[Genome]) -> list[float]:
        todo = list(dict.fromkeys(g for g in genomes if (stage, g) not in cache))
        if todo:
            for g, v in zip(todo, fitness(stage, todo)):
                cache[(stage, g)] = float(v)
            counted[0] += len(todo)
        return [cache[(stage, g)] for g in genomes]

    last = stages - 1
    names = list(named)
    start = values(last, [named[n] for n in names])
    seed_values = dict(zip(names, start))
    best_name = min(names, key=lambda n: (seed_values[n], names.index(n)))
    parent, parent_value = named[best_name], seed_values[best_name]
    history = [_entry(0, parent_value, start, counted[0], {"seed": best_name})]
    log = _Log(log_path)
    log.write({"generation": 0, "seeds": seed_values, "parent": key(parent), "fitness": parent_value})
    bar = tqdm(total=generations, desc="search", unit="gen", disable=not progress, leave=False)
    for gen in range(1, generations + 1):
        children: list[Genome] = []
        proposals: list = [None] * offspring
        if llm_ops is not None:
            evaluated = sorted(((g, v) for (st, g), v in cache.items() if st == last), key=lambda x: x[1])
            proposals = llm_ops.children(offspring, parent, parent_value, evaluated, rng)
        for proposal in proposals:
            if proposal is not None and proposal != parent and proposal not in children:
                children.append(proposal)
                stats["llm_children"] += 1
                continue
            if proposal is not None:
                stats["duplicate_replaced"] += 1
            if llm_ops is not None:
                stats["classic_fallback"] += 1
            for _ in range(MAX_TRIES):
                child = space.mutate(parent, rng)
                if child != parent and child not in children:
                    children.append(child)
                    break
        pool = children
        first_values = None
        for stage in range(last):
            vals = values(stage, pool)
            first_values = first_values or vals
            order = sorted(range(len(pool)), key=lambda i: (vals[i], i))
            pool = [pool[i] for i in order[: survivors[stage]]]
        finals = values(last, pool)
        first_values = first_values or finals
        winner = min(range(len(pool)), key=lambda i: (finals[i], i)) if pool else None
        replaced = winner is not None and finals[winner] < parent_value
        if replaced:
            parent, parent_value = pool[winner], finals[winner]
        history.append(_entry(gen, parent_value, first_values, counted[0], {"replaced": replaced}))
        line = {"generation": gen, "parent": key(parent), "fitness": parent_value, "replaced": replaced,
                "children": len(children), "total_evaluations": counted[0]}  # fmt: skip
        if llm_ops is not None:
            line.update(llm_stats=dict(stats), llm_replies=llm_ops.chat.drain_transcript())
        log.write(line)
        bar.update()
        bar.set_postfix(best=f"{parent_value:.4g}")
    bar.close()
    log.close()
    return LevelResult(parent, parent_value, best_name, history, counted[0], seed_values, dict(stats))


def _entry(gen: int, best: float, pool: Sequence[float], total: int, more: dict) -> dict:
    return {
        "generation": gen,
        "best_fitness": best,
        "median_fitness": statistics.median(pool) if pool else None,
        "total_evaluations": total,
        **more,
    }


class _Log:
    """JSONL, one line per generation, appended and flushed as it goes (a killed run keeps its log)."""

    def __init__(self, path: str | Path | None):
        self.f = None
        if path is not None:
            from ...distributed import is_main

            if is_main():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, line: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(line) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
