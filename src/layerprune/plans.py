"""Plans: JSON documents saying what to cut, for which model, and where the decision came from.

`layerprune plan` writes one, a person can read and edit it, `layerprune apply` applies it to the
model it names. One dataclass per kind of decision:

- `DepthPlan`: the units to remove, whole blocks ("3") or attention / MLP parts ("3.attn");
- `SparsityPlan`: a target sparsity per linear layer ("3.q") and the pruner that applies it;
- `WidthPlan`: a structured rate per block for attention heads and for MLP channels.

Every plan is checked twice. `validate()` runs on load and on save and needs no model: kinds, types,
ranges, names. `check(lm)` runs before apply, against the model's adapter: fingerprint, number of
blocks, every layer of the model present and no other, unit granularity supported. Each violation is
a `LayerpruneError` that says what is wrong and how to fix it. The format is versioned; version 1
files (one flat `Plan` with a nested `sparsity` dict) are still read.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from .errors import LayerpruneError
from .io import atomic_write_json, read_json
from .registry import SPARSITY_PRUNERS, Unit

PLAN_FORMAT = "layerprune.plan/2"
READABLE_FORMATS = ("layerprune.plan/1", PLAN_FORMAT)
KINDS = ("depth", "sparsity", "width")
MODEL_KEYS = ("name", "fingerprint", "num_blocks")


@dataclass(kw_only=True)
class Plan:
    """What every kind of plan records: the model it is for, the method and its parameters, the
    scores and calibration it came from, the seed, the software that made it."""

    kind: ClassVar[str] = ""
    model: dict  # name, fingerprint, architecture, num_blocks
    method: str
    params: dict = field(default_factory=dict)
    scores: list | None = None
    calibration: dict | None = None
    seed: int | None = None
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    # ---- documents ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "kind": self.kind, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        self.validate()
        return atomic_write_json(path, self.to_dict())

    @staticmethod
    def load(path: str | Path) -> Plan:
        doc = read_json(path, "plan", "layerprune plan")
        return Plan.from_dict(doc, str(path))

    @staticmethod
    def from_dict(doc: dict, where: str = "plan") -> Plan:
        if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
            raise LayerpruneError(
                f"{where} is not a layerprune plan (format {PLAN_FORMAT}); make one with `layerprune plan`"
            )
        doc = dict(doc)
        if doc.pop("format") == "layerprune.plan/1":
            doc = _upgrade_v1(doc)
        kind = doc.pop("kind", None)
        cls = PLAN_TYPES.get(kind)
        if cls is None:
            raise LayerpruneError(f"{where}: unknown plan kind '{kind}'; one of {', '.join(KINDS)}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise LayerpruneError(
                f"{where}: unknown field(s) {', '.join(unknown)} in a {kind} plan; remove them"
            )
        missing = sorted(f.name for f in fields(cls) if f.name not in doc and _required(f))
        if missing:
            raise LayerpruneError(
                f"{where}: the {kind} plan lacks {', '.join(missing)}; re-make it with `layerprune plan`"
            )
        plan = cls(**doc)
        plan.validate(where)
        return plan

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, where: str = "plan") -> None:
        """Checks that need no model. Raises LayerpruneError naming the field and the fix."""
        if not isinstance(self.model, dict):
            raise LayerpruneError(f"{where}: 'model' must be an object with {', '.join(MODEL_KEYS)}")
        for key in MODEL_KEYS:
            if key not in self.model:
                raise LayerpruneError(
                    f"{where}: model.{key} is missing; re-make the plan with `layerprune plan`"
                )
        L = self.model["num_blocks"]
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise LayerpruneError(f"{where}: model.num_blocks must be a positive integer, not {L!r}")
        if not isinstance(self.method, str) or not self.method:
            raise LayerpruneError(f"{where}: 'method' must be a non-empty string")
        if not isinstance(self.params, dict) or not isinstance(self.extra, dict):
            raise LayerpruneError(f"{where}: 'params' and 'extra' must be objects")

    def check(self, lm, where: str = "plan") -> None:
        """Checks against the loaded model, before anything is changed."""
        self.validate(where)
        if not lm.same_model(self.model):
            raise LayerpruneError(
                f"{where} was made for model {self.model['name']} (fingerprint {self.model['fingerprint']}), "
                f"not for {lm.name} (fingerprint {lm.fingerprint}){lm.dtype_hint(self.model)}; "
                "pass the model it was made for with --model"
            )
        if self.model["num_blocks"] != lm.adapter.num_blocks:
            raise LayerpruneError(
                f"{where} is for {self.model['num_blocks']} blocks but {lm.name} has {lm.adapter.num_blocks}; "
                "re-make the plan for this model"
            )

    @property
    def num_blocks(self) -> int:
        return int(self.model["num_blocks"])


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


@dataclass(kw_only=True)
class DepthPlan(Plan):
    kind: ClassVar[str] = "depth"
    remove: list[str]  # "3" (a whole block) or "3.attn" / "3.mlp"
    unit: str = "block"  # the granularity the scores were computed at: block | module

    def __post_init__(self) -> None:
        # a hand-edited plan may list blocks as numbers ([3, 5, 7]): the blocks "3", "5", "7"
        if isinstance(self.remove, list):
            self.remove = [str(u) if type(u) is int else u for u in self.remove]

    def units(self):
        return [Unit.parse(u) for u in self.remove]

    def validate(self, where: str = "plan") -> None:
        super().validate(where)
        if self.unit not in ("block", "module"):
            raise LayerpruneError(f"{where}: unit '{self.unit}' must be block or module")
        if not isinstance(self.remove, list) or not self.remove:
            raise LayerpruneError(
                f'{where}: \'remove\' must be a non-empty list of units like "3" or "3.attn"'
            )
        try:
            units = self.units()
        except LayerpruneError as e:
            raise LayerpruneError(f"{where}: {e}") from None
        L = self.num_blocks
        bad = [str(u) for u in units if u.block >= L]
        if bad:
            raise LayerpruneError(f"{where}: units {bad} do not exist in a model of {L} blocks (0..{L - 1})")
        if len(set(units)) != len(units):
            raise LayerpruneError(f"{where}: 'remove' lists a unit twice; list each once")
        if self.unit == "block" and any(u.part != "block" for u in units):
            raise LayerpruneError(
                f'{where}: a block-unit plan lists parts; set "unit": "module" or remove them'
            )
        whole = {u.block for u in units if u.part == "block"}
        parts: dict[int, set[str]] = {}
        for u in units:
            if u.part != "block":
                parts.setdefault(u.block, set()).add(u.part)
        whole |= {b for b, p in parts.items() if p == {"attn", "mlp"}}
        if len(whole) >= L:
            raise LayerpruneError(f"{where}: removes all {L} blocks; keep at least one")

    def check(self, lm, where: str = "plan") -> None:
        super().check(lm, where)
        if any(u.part != "block" for u in self.units()) and not lm.adapter.has_parts():
            raise LayerpruneError(
                f"{where} removes attention / MLP parts, but {lm.adapter.spec.name} blocks have no such split"
            )


@dataclass(kw_only=True)
class SparsityPlan(Plan):
    kind: ClassVar[str] = "sparsity"
    pruner: str  # magnitude | wanda | sparsegpt
    layers: dict[str, float]  # "block.role" -> target sparsity in [0, 1)
    nm: list[int] | None = None  # [N, M]: N zeros in every M consecutive inputs

    def validate(self, where: str = "plan") -> None:
        super().validate(where)
        if self.pruner not in SPARSITY_PRUNERS:
            raise LayerpruneError(
                f"{where}: unknown pruner '{self.pruner}'; one of {', '.join(SPARSITY_PRUNERS)}"
            )
        if self.nm is not None and (
            not isinstance(self.nm, (list, tuple)) or len(self.nm) != 2 or not 0 < self.nm[0] < self.nm[1]
        ):
            raise LayerpruneError(
                f"{where}: nm {self.nm!r} must be [N, M] with 0 < N < M, e.g. [2, 4], or null"
            )
        if not isinstance(self.layers, dict) or not self.layers:
            raise LayerpruneError(f"{where}: 'layers' must map every linear layer ('3.q') to a sparsity")
        L = self.num_blocks
        for name, s in self.layers.items():
            block, _, role = str(name).partition(".")
            if not block.isdigit() or not role:
                raise LayerpruneError(f"{where}: layer '{name}' is not 'block.role' (e.g. 3.q)")
            if int(block) >= L:
                raise LayerpruneError(f"{where}: layer '{name}' does not exist in a model of {L} blocks")
            if (
                isinstance(s, bool)
                or not isinstance(s, (int, float))
                or not math.isfinite(s)
                or not 0 <= s < 1
            ):
                raise LayerpruneError(
                    f"{where}: layer {name} has sparsity {s!r}; each must be a number in [0, 1)"
                )

    def check(self, lm, where: str = "plan") -> None:
        super().check(lm, where)
        names = lm.adapter.layer_names()
        unknown = sorted(set(self.layers) - set(names), key=_layer_key)
        if unknown:
            raise LayerpruneError(
                f"{where}: layers {unknown[:5]} are not linear layers of {lm.name} (roles {', '.join(lm.adapter.roles)}); "
                "remove them"
            )
        missing = [n for n in names if n not in self.layers]
        if missing:
            raise LayerpruneError(
                f"{where}: no sparsity for layers {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "give every layer a target (0 to keep it dense)"
            )

    @property
    def target(self) -> float | None:
        return self.params.get("target")


@dataclass(kw_only=True)
class WidthPlan(Plan):
    """Per block, the fraction of attention heads (in whole KV groups) and of MLP channels removed.

    `deploy` ("decilm"): the plan keeps to what the DeciLM / Nemotron-NAS format carries
    (`models/width_decisions.py` `Deployable`): an attention rate is 0 or 1 (removed whole, never in
    block 0), MLP channels are kept in multiples of `channel_multiple`, and an MLP rate of 1 (with an
    attention rate of 1) deletes the block."""

    kind: ClassVar[str] = "width"
    attn: list[float]
    mlp: list[float]
    pruner: str = "wanda-sp"
    deploy: str | None = None
    channel_multiple: int | None = None

    def validate(self, where: str = "plan") -> None:
        super().validate(where)
        L = self.num_blocks
        if self.deploy not in (None, "decilm"):
            raise LayerpruneError(f'{where}: deploy is {self.deploy!r}; use "decilm" or null')
        m = self.channel_multiple
        if self.deploy and (isinstance(m, bool) or not isinstance(m, int) or m < 256 or m % 256):
            raise LayerpruneError(
                f"{where}: channel_multiple {m!r} must be a multiple of 256 (DeciLM widths come from "
                "ffn_mult rounded up to a multiple of 256)"
            )
        top = 1 if self.deploy else 1 - 1e-12
        for part in ("attn", "mlp"):
            rates = getattr(self, part)
            if not isinstance(rates, list) or len(rates) != L:
                raise LayerpruneError(f"{where}: '{part}' must list one rate per block ({L})")
            for i, r in enumerate(rates):
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= top:
                    raise LayerpruneError(
                        f"{where}: {part} rate of block {i} is {r!r}; each must be in "
                        + ("[0, 1]" if self.deploy else "[0, 1)")
                    )
        if self.deploy:
            for i, (a, r) in enumerate(zip(self.attn, self.mlp)):
                if a not in (0, 1):
                    raise LayerpruneError(
                        f"{where}: a deployable plan keeps or removes attention whole: block {i}'s rate is {a}, use 0 or 1"
                    )
                if a and i == 0:
                    raise LayerpruneError(
                        f"{where}: a deployable plan never removes block 0's attention; set it to 0"
                    )
                if r == 1 and not a:
                    raise LayerpruneError(
                        f"{where}: block {i} removes its MLP but keeps its attention, which llama.cpp's deci "
                        "runtime computes wrongly; remove both (the block) or keep some MLP channels"
                    )

    def check(self, lm, where: str = "plan") -> None:
        super().check(lm, where)  # deployable plans: the architecture is checked where they are applied
        for i, (a, m) in enumerate(zip(self.attn, self.mlp)):
            groups, channels = lm.adapter.width_units(i)
            if self.deploy:
                kept = channels - round(m * channels)
                if kept and kept % self.channel_multiple:
                    raise LayerpruneError(
                        f"{where}: block {i} keeps {kept} MLP channels, not a multiple of {self.channel_multiple}; "
                        "re-make the plan with --deploy decilm"
                    )
                continue
            if round(a * groups) >= groups:
                raise LayerpruneError(
                    f"{where}: an attention rate of {a} removes all {groups} KV groups of block {i}; keep at "
                    f"least one (a rate below {(groups - 0.5) / groups:.3f}), or remove the block with a depth plan"
                )
            if round(m * channels) >= channels:
                raise LayerpruneError(
                    f"{where}: an MLP rate of {m} removes all {channels} channels of block {i}; lower it"
                )


PLAN_TYPES: dict[str, type[Plan]] = {cls.kind: cls for cls in (DepthPlan, SparsityPlan, WidthPlan)}


def _layer_key(name: str):
    block, _, role = name.partition(".")
    return (int(block) if block.isdigit() else -1, role)


def _upgrade_v1(doc: dict) -> dict:
    """Version 1: one flat Plan; sparsity plans kept pruner, nm and layers in a nested dict."""
    kind = doc.get("kind")
    sp = doc.pop("sparsity", None) or {}
    if kind == "sparsity":
        doc.update(pruner=sp.get("pruner"), nm=sp.get("nm"), layers=sp.get("layers"))
        doc.pop("remove", None)
        doc.pop("unit", None)
    return doc
