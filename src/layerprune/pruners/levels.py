"""Build a level database (engine/levels.py): every linear layer pruned by magnitude, Wanda or
SparseGPT at each of its sparsities, once.

Each entry is the pruner applied to that layer alone: its statistics (Wanda's column norms,
SparseGPT's Hessian) come from the inputs the dense model gives it, as EvoPress builds its database
(the block is never changed during the pass: the next block sees the dense outputs), and every
sparsity starts from the dense weight. SparseGPT computes its Hessian once per layer for all the
sparsities. A search can then combine the entries of different layers freely.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine.levels import FORMAT, MANIFEST, LevelDatabase, pack
from ..engine.sequential import ColumnNorms, Hessian, run_sequential
from ..errors import LayerpruneError
from ..registry import SPARSITY_PRUNERS
from .unstructured import magnitude, sparsegpt, wanda


@torch.no_grad()
def build_levels(
    lm,
    pruner: str,
    sparsities: dict[str, list[float]],
    windows,
    path: str | Path,
    *,
    extra: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> LevelDatabase:
    """Prune every layer of `sparsities` ('3.q' -> its sparsities) at each of them into a new level
    database at `path` (an existing one is opened and checked instead, so a search resumes on it)."""
    path = Path(path)
    if pruner not in SPARSITY_PRUNERS:
        raise LayerpruneError(f"unknown pruner '{pruner}'; use one of {', '.join(SPARSITY_PRUNERS)}")
    if (path / MANIFEST).exists():
        db = LevelDatabase(path)
        db.check(lm, pruner, sparsities)
        return db
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LayerpruneError(f"{path} exists and is not a level database; choose a new --levels-db folder")
    if pruner != "magnitude" and windows is None:
        raise LayerpruneError(f"{pruner} levels need calibration windows")
    adapter = lm.adapter
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:

        def save_block(i: int, stats: dict | None) -> None:
            tensors = {}
            for role, layer in adapter.linears(i).items():
                name = f"{i}.{role}"
                if name not in sparsities:
                    continue
                W = adapter.weight(layer).detach()
                tensors[role] = W.contiguous().cpu()
                for j, s in enumerate(sparsities[name]):
                    if pruner == "magnitude":
                        entry = pack(magnitude(W, s))
                    elif pruner == "wanda":
                        entry = pack(wanda(W, stats[role].norms(), s))
                    else:
                        new, mask = sparsegpt(W, stats[role].value(), s)
                        entry = new.masked_fill(mask, 0.0).to(W.dtype).contiguous().cpu()
                    tensors[f"{role}@{j}"] = entry
            save_file(tensors, str(tmp / f"block-{i}.safetensors"))

        if pruner == "magnitude":
            for i in range(adapter.num_blocks):
                with adapter.resident(i):
                    save_block(i, None)
        else:

            def on_block(i: int, calibrate) -> None:
                roles = [r for r in adapter.linears(i) if f"{i}.{r}" in sparsities]
                stats = {r: ColumnNorms() if pruner == "wanda" else Hessian() for r in roles}
                calibrate(lambda role, x: stats[role].add(x) if role in stats else None)
                save_block(i, stats)

            run_sequential(lm.model, adapter, windows.input_ids, on_block, batch_size=batch_size,
                           progress=progress, desc=f"{pruner} levels", modifies=False)  # fmt: skip
        manifest = {
            "format": FORMAT,
            "model": {"name": lm.name, "fingerprint": lm.fingerprint, "num_blocks": adapter.num_blocks},
            "pruner": pruner,
            "kind": "weights" if pruner == "sparsegpt" else "masks",
            "calibration": None if windows is None or pruner == "magnitude" else windows.protocol,
            "layers": {
                name: {"numel": adapter.layer(name).weight.numel(), "sparsities": list(ss)}
                for name, ss in sparsities.items()
            },
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if path.exists():  # an empty folder made for it
            path.rmdir()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LevelDatabase(path)
