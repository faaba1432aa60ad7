"""The words of the LLM operators: the system message, the prompts (the task, the population, what to
answer and how) and the reading of a reply's text. Text only: no requests, no validation counts."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

SYSTEM = (
    "You are the variation operator of an evolutionary search over layer-wise structured pruning rates "
    "of a large language model. Answer with one strict JSON object and nothing else: no prose, no "
    "markdown, no code fences."
)


def _fmt(rates: Sequence[float]) -> str:
    return "[" + ", ".join(f"{r:.4f}" for r in rates) + "]"


def _fitness(v: float | None) -> str:
    return f"{v:.6g}" if v is not None and math.isfinite(v) else "failed"


def _strip(text: str) -> str:
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
    fence = re.fullmatch(r"```[A-Za-z]*\s*(.*?)\s*```", text, flags=re.S)
    return fence.group(1) if fence else text


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_index(v: Any, n: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n


class Prompts:
    """The prompts for one search: L blocks, target beta, weights (parameters per block), bounds."""

    def __init__(self, L: int, beta: float, weights: Sequence[float], p_min: float, p_max: float):
        self.L, self.beta, self.p_min, self.p_max = L, beta, p_min, p_max
        self.weights = list(weights)

    def task(self) -> str:
        total = sum(self.weights)
        shares = ", ".join(f"{w / total:.4f}" for w in self.weights)
        return (
            f"Task: prune a large language model with L = {self.L} transformer blocks (block 0 is the first). "
            f"A candidate is a JSON list of exactly {self.L} pruning rates, one per block, each in "
            f"[{self.p_min}, {self.p_max}]: the fraction of that block's structures removed. The mean of the "
            f"rates weighted by each block's share of the parameters must be {self.beta}. Shares: [{shares}]. "
            "Fitness is the calibration perplexity of the pruned model: LOWER fitness is better.\n"
        )

    def population(self, pop: Sequence) -> str:
        lines = [f"{i}: fitness {_fitness(c.fitness)} rates {_fmt(c.rates)}" for i, c in enumerate(pop)]
        return "Current population, sorted by fitness (best first), index: fitness, rates:\n" + "\n".join(
            lines
        )

    def children_format(self, n: int) -> str:
        return (
            f'Reply with strict JSON only: {{"children": [[r_0, ..., r_{self.L - 1}], ...]}} holding exactly '
            f"{n} lists of {self.L} numbers, in the order asked."
        )

    def initial(self, n: int, seeds: Mapping[str, Sequence[float]]) -> str:
        known = "".join(f"{name}: {_fmt(r)}\n" for name, r in seeds.items())
        return (
            self.task()
            + f"\nPropose {n} diverse initial candidates around the uniform allocation (every rate {self.beta}). "
            "Blocks whose removal hurts the model most should get lower rates.\n"
            + (
                f"Known allocations (not yet evaluated), to learn from but not to repeat:\n{known}"
                if known
                else ""
            )
            + "\n"
            + self.children_format(n)
        )

    def select(self, pop: Sequence, crossovers: int, mutations: int) -> str:
        n = len(pop)
        return (
            self.task()
            + "\n"
            + self.population(pop)
            + f"\n\nChoose parents: {crossovers} pairs for crossover and {mutations} single candidates for "
            "mutation, favouring low fitness while keeping diversity. Reply with strict JSON only: "
            f'{{"parents": [[i, j], ...], "mutants": [k, ...]}} with exactly {crossovers} pairs and '
            f"{mutations} indices, each an index 0..{n - 1} of the list above."
        )

    def crossover(self, pop: Sequence, pairs: Sequence[tuple[int, int]]) -> str:
        asked = "\n".join(
            f"pair {k}: parents {i} and {j}: {_fmt(pop[i].rates)} x {_fmt(pop[j].rates)}"
            for k, (i, j) in enumerate(pairs)
        )
        return (
            self.task()
            + "\n"
            + self.population(pop)
            + f"\n\nCrossover: for each of the {len(pairs)} pairs below propose one child that combines what "
            "makes its parents good (keep the weighted mean and the bounds), different from every candidate "
            f"above.\n{asked}\n\n" + self.children_format(len(pairs))
        )

    def mutate(self, pop: Sequence, mutants: Sequence[int]) -> str:
        asked = "\n".join(f"mutant {k}: candidate {i}: {_fmt(pop[i].rates)}" for k, i in enumerate(mutants))
        return (
            self.task()
            + "\n"
            + self.population(pop)
            + f"\n\nMutation: for each of the {len(mutants)} candidates below propose one mutated child: move "
            "a few rates by about 0.05 (some up, some down, so the weighted mean stays the same), towards what "
            f"the fitness values suggest, different from every candidate above.\n{asked}\n\n"
            + self.children_format(len(mutants))
        )
