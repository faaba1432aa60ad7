"""The plan: a JSON document saying what to cut, for which model, and where the decision came from.

`layerprune plan` writes one, a person can read and edit it, `layerprune apply` applies it to the
model it names (checked by fingerprint). Kinds: "depth" (units to remove), "sparsity" (a target
per linear layer and the pruner), "width" (a structured rate per block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LayerpruneError
from .io import atomic_write_json, read_document

PLAN_FORMAT = "layerprune.plan/1"
KINDS = ("depth", "sparsity", "width")


@dataclass
class Plan:
    kind: str
    model: dict  # name, fingerprint, architecture, num_blocks
    method: str
    params: dict
    remove: list[str] = field(default_factory=list)  # depth: units, "3" or "3.attn"
    unit: str = "block"
    sparsity: dict = field(default_factory=dict)  # sparsity: {"pruner", "nm", "layers": {name: target}}
    scores: list[float | None] | None = None
    calibration: dict | None = None
    seed: int | None = None
    provenance: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        doc = read_document(path, PLAN_FORMAT, "plan", "layerprune plan")
        try:
            plan = cls(**doc)
        except TypeError as e:
            raise LayerpruneError(f"plan {path} is malformed: {e}") from None
        plan.validate(str(path))
        return plan

    def validate(self, where: str = "plan") -> None:
        if self.kind not in KINDS:
            raise LayerpruneError(f"{where}: unknown kind '{self.kind}'; one of {', '.join(KINDS)}")
        for key in ("name", "fingerprint", "num_blocks"):
            if key not in self.model:
                raise LayerpruneError(f"{where}: model.{key} is missing")
        if self.kind == "depth":
            from .models.adapter import Unit

            units = [Unit.parse(u) for u in self.remove]
            L = int(self.model["num_blocks"])
            bad = [str(u) for u in units if u.block >= L]
            if bad:
                raise LayerpruneError(f"{where}: units {bad} do not exist in a model of {L} blocks")
            if len({u.block for u in units if u.part == "block"}) >= L:
                raise LayerpruneError(f"{where}: removes all {L} blocks; keep at least one")
