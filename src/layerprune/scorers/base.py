"""What every scorer returns, and the scores.json file a user keeps.

A scorer is a function `score(model, adapter, windows, *, unit, removed, ...) -> MethodScores`:
one importance per unit (block, or attention / MLP part), higher = more important, None for units
already removed (`removed`, used by iterative planning). Scorers never import each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LayerpruneError
from ..io import atomic_write_json, read_document

SCORES_FORMAT = "layerprune.scores/1"


@dataclass
class MethodScores:
    importance: list[float | None]
    extra: dict = field(default_factory=dict)


@dataclass
class Scores:
    method: str
    unit: str  # "block" | "module"
    units: list[str]  # "0", "1", ... or "0.attn", "0.mlp", ...
    importance: list[float | None]  # higher = more important
    model: dict  # name, fingerprint, architecture, num_blocks
    params: dict  # the scorer's parameters
    calibration: dict | None  # the protocol of the calibration windows (None for data-free scores)
    seconds: float
    extra: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": SCORES_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, _finite(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        doc = read_document(path, SCORES_FORMAT, "scores file", "layerprune score")
        try:
            s = cls(**doc)
        except TypeError as e:
            raise LayerpruneError(f"{path} is malformed: {e}") from None
        if len(s.importance) != len(s.units):
            raise LayerpruneError(
                f"{path} has {len(s.importance)} importances for {len(s.units)} units; re-run `layerprune score`"
            )
        return s


def _finite(obj):
    """JSON has no inf/nan: write them as null (a unit that cannot be scored)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def leave_one_out(keep: list[bool], candidates: list[int]) -> list[list[bool]]:
    """For each candidate j, the mask `keep` with unit j removed as well."""
    masks = []
    for j in candidates:
        m = list(keep)
        m[j] = False
        masks.append(m)
    return masks


def keep_mask(n: int, removed) -> list[bool]:
    if removed is None:
        return [True] * n
    if len(removed) != n:
        raise LayerpruneError(f"removed-units mask has {len(removed)} entries for {n} units")
    return [not bool(r) for r in removed]
