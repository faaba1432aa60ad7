"""What every scorer returns, and the scores.json file a user keeps.

A scorer is a function `score(model, adapter, windows, *, unit, removed, ...) -> MethodScores`:
one importance per unit (block, or attention / MLP part), higher = more important, None for units
already removed (`removed`, used by iterative planning). Scorers never import each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    feeds: str = ""  # the kind of plan these scores can feed: depth | sparsity (from the method)

    def __post_init__(self) -> None:
        from . import FEEDS

        if self.method not in FEEDS:
            raise LayerpruneError(f"scores of unknown method '{self.method}'; one of {', '.join(FEEDS)}")
        if self.feeds and self.feeds != FEEDS[self.method]:
            raise LayerpruneError(
                f"{self.method} scores feed {FEEDS[self.method]} plans, not {self.feeds}; re-run `layerprune score`"
            )
        self.feeds = FEEDS[self.method]

    def require(self, kind: str, lm=None, what: str = "scores") -> None:
        """Refuse scores that cannot feed a `kind` plan, or that were computed on another model."""
        if self.feeds != kind:
            fix = {"depth": "--remove N or --ratio R", "sparsity": "--sparsity S", "width": "--width B"}[
                self.feeds
            ]
            raise LayerpruneError(
                f"{what} holds {self.method} scores, which feed {self.feeds} plans, not {kind} plans; "
                f"plan with them using {fix}, or score with a {kind} method"
            )
        if lm is not None and not lm.same_model(self.model):
            raise LayerpruneError(
                f"{what} was computed on model {self.model.get('name')} (fingerprint {self.model.get('fingerprint')}), "
                f"not on {lm.name} ({lm.fingerprint}){lm.dtype_hint(self.model)}; "
                "score this model with `layerprune score`"
            )

    def to_dict(self) -> dict:
        return {"format": SCORES_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, _finite(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        doc = read_document(path, SCORES_FORMAT, "scores file", "layerprune score")
        try:
            s = cls(**doc)
        except LayerpruneError as e:
            raise LayerpruneError(f"{path}: {e}") from None
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


DEFAULT_PROTECT = {"taylor": "plus", "sleb": "ends"}


def protected_blocks(spec: str | Sequence[int] | None, num_blocks: int, method: str) -> list[int]:
    """'plus', 'ends', 'none', 'default' or a list like '0,1,-1' (negative counts from the end)."""
    if spec is None or spec == "default":
        spec = DEFAULT_PROTECT.get(method, "none")
    L = num_blocks
    if spec == "none":
        return []
    if spec == "plus":
        return sorted({0, 1, 2, 3, L - 2, L - 1} & set(range(L)))
    if spec == "ends":
        return sorted({0, L - 1})
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        try:
            i = int(item)
        except ValueError:
            raise LayerpruneError(
                f"--protect '{spec}': use plus, ends, none or block indices like 0,1,-1"
            ) from None
        if not -L <= i < L:
            raise LayerpruneError(f"--protect: block {i} does not exist in a model of {L} blocks")
        out.add(i % L)
    return sorted(out)
