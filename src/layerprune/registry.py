"""The names a plan speaks, at the bottom of the import graph: units of depth, the unstructured
pruners and their N:M patterns, the width pruners.

Plain data and arithmetic, no torch: `plans.py` validates a recipe against these names, and the CLI
offers them as choices, without importing the pruners that implement them, or torch
(tests/test_registry.py checks that every name here works)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LayerpruneError

SPARSITY_PRUNERS = ("magnitude", "wanda", "sparsegpt")  # pruners/unstructured.py
WIDTH_PRUNERS = ("wanda-sp", "magnitude-sp", "flap")  # scorers of KV groups and channels; pruners/width.py
SPECTRAL_METRICS = (
    "alpha_peak",
    "alpha_mid",
    "alpha_hat",
    "stable_rank",
    "spectral_norm",
    "entropy",
)  # scorers/spectral.py
PARTS = ("attn", "mlp")  # the parts of a block that depth (as units) and width (as widths) prune


@dataclass(frozen=True, order=True)
class Unit:
    """A prunable unit of depth: a whole block, or its attention or MLP part."""

    block: int
    part: str = "block"  # "block" | "attn" | "mlp"

    def __str__(self) -> str:
        return str(self.block) if self.part == "block" else f"{self.block}.{self.part}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        block, _, part = str(text).partition(".")
        if not block.isdigit() or part not in ("", *PARTS):
            raise LayerpruneError(f"unit '{text}' is not a block index ('3') or a part ('3.attn', '3.mlp')")
        return cls(int(block), part or "block")


def parse_nm(text: str | None) -> tuple[int, int] | None:
    if text in (None, "", "none"):
        return None
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise LayerpruneError(f"--nm '{text}' must look like 2:4 (N zeros in every M weights)") from None
    if not 0 < n < m:
        raise LayerpruneError(f"--nm {n}:{m}: N must be at least 1 and smaller than M (e.g. 2:4)")
    return n, m


# A target written to two decimals (0.33 for 1:3) still names its pattern.
NM_TOLERANCE = 0.005


def check_nm_target(sparsity: float, nm: tuple[int, int]) -> None:
    """N:M zeros N of every M weights: the mean sparsity is N/M. A target that disagrees would be
    rounded to another pattern, layer by layer (0.7 with 2:4 pruned 3 of every 4), so it is refused."""
    n, m = nm
    if abs(sparsity - n / m) <= NM_TOLERANCE:
        return
    near = nm_for(sparsity, nm)
    other = f", or --nm {near[0]}:{m} for {round(near[0] / m, 4):g}" if near != (n, m) else ""
    raise LayerpruneError(
        f"--nm {n}:{m} zeros {n} of every {m} weights, a sparsity of {round(n / m, 4):g}, not {sparsity:g}; "
        f"pass --sparsity {round(n / m, 4):g}{other}"
    )


def nm_for(sparsity: float, nm: tuple[int, int]) -> tuple[int, int]:
    """The N:M pattern of a layer whose target is `sparsity` (N = round(s * M), 0 < N < M)."""
    n = min(max(round(sparsity * nm[1]), 1), nm[1] - 1)
    return n, nm[1]
