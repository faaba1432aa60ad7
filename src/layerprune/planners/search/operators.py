"""The classic genetic operators of the search: tournament selection (size 3) on fitness; crossover =
uniform or BLX-0.5 blend, chosen at random; Gaussian mutation (sigma 0.05) of a random subset of
genes; Dirichlet initialisation around beta. Every child is repaired onto the constraint."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .constraint import DEFAULT_P_MAX, DEFAULT_P_MIN, Rates, repair

TOURNAMENT_SIZE = 3
BLEND_ALPHA = 0.5
MUTATION_SIGMA = 0.05
MUTATION_FRACTION = 0.25  # each gene mutated with this probability (at least one per child)


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
