"""A level database: every prunable linear layer pruned once at each of its sparsities (EvoPress).

A search over per-layer sparsities assembles each candidate from it instead of pruning again:
`assign(adapter, {layer: sparsity})` copies into the model only the layers whose sparsity changed
since the last candidate. The folder (built by pruners/levels.py, written to a temporary folder
and renamed):

    manifest.json          format, model (name, fingerprint, blocks), pruner, calibration protocol,
                           per layer its sparsities; "kind": "masks" or "weights"
    block-<i>.safetensors  per layer of block i: '<role>' its dense weight, '<role>@<j>' the layer
                           at its j-th sparsity: a packed bit mask of the removed weights (magnitude,
                           Wanda: the kept weights are the dense ones) or the pruned weight itself
                           (SparseGPT updates the weights it keeps)

Weights are in the (out, in) orientation of `adapter.weight`. The tensors are read from disk as
they are needed (memory-mapped), so a database larger than memory works: the model in memory is the
only full copy of the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import LayerpruneError
from ..models.adapter import ModelAdapter
from .store import LEGACY_NUMERICS

FORMAT = "layerprune.levels/1"
MANIFEST = "manifest.json"


def pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack(bits: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool)).reshape(shape)


def sparsity_key(s: float) -> str:
    return f"{s:.9f}"


class LevelDatabase:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise LayerpruneError(
                f"{self.path} is not a level database (no readable {MANIFEST}); choose a new --levels-db folder"
            ) from None
        if self.manifest.get("format") != FORMAT:
            raise LayerpruneError(
                f"{self.path} is not a level database ({FORMAT}); choose a new --levels-db folder"
            )
        self.kind = self.manifest["kind"]
        self.layers: dict[str, dict] = self.manifest["layers"]
        self._index = {
            name: {sparsity_key(s): j for j, s in enumerate(info["sparsities"])}
            for name, info in self.layers.items()
        }
        self._files: dict[int, object] = {}
        self.current: dict[str, float | None] = {}  # layer -> sparsity in the model now (None: dense)
        self.loads = 0  # layers copied into the model

    @property
    def pruner(self) -> str:
        return self.manifest["pruner"]

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("block-*.safetensors"))

    def check(
        self, lm, pruner: str | None = None, sparsities: dict[str, list[float]] | None = None, inputs=None
    ) -> None:
        """One line when the database is of another model, pruner, set of sparsities or inputs."""
        m = self.manifest["model"]
        if m["fingerprint"] != lm.fingerprint:
            raise LayerpruneError(
                f"level database {self.path} was built for model {m['name']} (fingerprint {m['fingerprint']}), "
                f"not for {lm.name} ({lm.fingerprint}); choose a new --levels-db folder"
            )
        have = m.get("numerics", LEGACY_NUMERICS)
        if have != lm.numerics_key:
            raise LayerpruneError(
                f"level database {self.path} was computed in {have.replace('@', ' on ')}, not in "
                f"{lm.numerics_key.replace('@', ' on ')}; choose a new --levels-db folder, or run with its --dtype / --device"
            )
        if pruner is not None and pruner != self.pruner:
            raise LayerpruneError(
                f"level database {self.path} holds {self.pruner} levels, not {pruner}; choose a new --levels-db folder"
            )
        have_inputs = self.manifest.get("inputs", "dense")
        if inputs is not None and pruner != "magnitude" and inputs != have_inputs:
            raise LayerpruneError(
                f"level database {self.path} was built on {have_inputs} inputs, not {inputs}; "
                "choose a new --levels-db folder"
            )
        for name, wanted in (sparsities or {}).items():
            have = self._index.get(name, {})
            if any(sparsity_key(s) not in have for s in wanted):
                raise LayerpruneError(
                    f"level database {self.path} lacks sparsities of layer {name} that this search needs "
                    "(another target or --levels step); choose a new --levels-db folder"
                )

    def _file(self, block: int):
        from safetensors import safe_open

        if block not in self._files:
            self._files[block] = safe_open(str(self.path / f"block-{block}.safetensors"), framework="pt")
        return self._files[block]

    def weight(self, name: str, sparsity: float | None) -> torch.Tensor:
        """Layer `name` at `sparsity` (None: dense), (out, in)."""
        block, _, role = name.partition(".")
        f = self._file(int(block))
        dense = f.get_tensor(role)
        if sparsity is None:
            return dense
        j = self._index[name].get(sparsity_key(sparsity))
        if j is None:
            raise LayerpruneError(f"level database {self.path} has no sparsity {sparsity} for layer {name}")
        entry = f.get_tensor(f"{role}@{j}")
        if self.kind == "weights":
            return entry
        return dense.masked_fill(unpack(entry, dense.shape), 0)

    @torch.no_grad()
    def assign(self, adapter: ModelAdapter, sparsities: dict[str, float | None]) -> None:
        """Put every layer named at its sparsity (None: dense), copying only what changed."""
        for name, s in sparsities.items():
            if self.current.get(name) == s:  # absent: dense, as the model came
                continue
            w = adapter.weight(adapter.layer(name))
            w.copy_(self.weight(name, s).to(w.device, w.dtype))
            self.current[name] = s
            self.loads += 1

    def restore(self, adapter: ModelAdapter) -> None:
        """The model's dense weights back in every layer this database changed."""
        self.assign(adapter, dict.fromkeys(self.current, None))
        self.current = {}

    def close(self) -> None:
        self._files.clear()
