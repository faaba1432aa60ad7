"""The constraint on a genome of the search: L rates, one per block, each in [p_min, p_max], whose mean
weighted by the blocks' parameters is the target beta. `check_bounds` says whether such a vector
exists, `repair` moves any vector onto the constraint, `weighted_mean` measures it.

Bounds: p_min = 0 lets the search leave a sensitive block (often the first ones) unpruned; p_max = 0.9
keeps at least 10% of every block's structures, so no block is emptied (removing a whole block is a
depth decision, another planner's job) while leaving room for targets up to 0.9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ...errors import LayerpruneError

DEFAULT_P_MIN = 0.0
DEFAULT_P_MAX = 0.9
TOLERANCE = 1e-9

Rates = list[float]


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
