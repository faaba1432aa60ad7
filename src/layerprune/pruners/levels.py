"""Build a level database (engine/levels.py): every linear layer pruned by magnitude, Wanda or
SparseGPT at each of its sparsities, once.

Each entry is the pruner applied to that layer alone, every sparsity starting from the dense weight;
what differs is the inputs its statistics (Wanda's column norms, SparseGPT's Hessian) come from:

- `inputs="target"` (default): the inputs of a model whose earlier blocks are pruned uniformly at the
  target (the level-0 entries), as `apply` will feed a plan near the target: block by block, the
  entries of block i are computed, then block i is set to its level-0 entries and its outputs feed
  block i + 1. The model is dense again afterwards.
- `inputs="dense"`: the dense model's inputs, as EvoPress builds its sparsity database. On SmolLM2-135M
  at 70 % this makes SparseGPT's entries much worse than the sequential pruner (stitched uniform 139.5
  vs 60.4 held-out ppl): SparseGPT's reconstruction depends on the pruned inputs it will see.

All the layers of a block are calibrated in one pass before any is changed (as `apply` does), so an
entry never depends on the levels of its block's other layers. SparseGPT computes its Hessian once
per layer for all the sparsities. A search can then combine the entries of different layers freely.

The database is built in a hidden folder next to `path` and renamed when complete. A build that was
killed or interrupted (Ctrl-C, SIGTERM) leaves its folder with the blocks finished so far (each
written whole); the next build of the same database (same model, pruner, sparsities, inputs and
calibration) takes it over and computes only the blocks that are missing; one of anything else is
removed. A build that fails removes its folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..engine.levels import FORMAT, MANIFEST, LevelDatabase, pack, unpack
from ..engine.sequential import ColumnNorms, Hessian, SharedStats, run_sequential
from ..errors import LayerpruneError
from ..io import beside_pattern, check_destination, owner_tag, publish, remove_stale, stale, temp_dir_beside
from ..registry import SPARSITY_PRUNERS
from .unstructured import magnitude, shared_factor, sparsegpt, wanda


@torch.no_grad()
def build_levels(
    lm,
    pruner: str,
    sparsities: dict[str, list[float]],
    windows,
    path: str | Path,
    *,
    target: float | None = None,
    inputs: str = "target",
    extra: dict | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> LevelDatabase:
    """Prune every layer of `sparsities` ('3.q' -> its sparsities) at each of them into a new level
    database at `path` (an existing one is opened and checked instead, so a search resumes on it).
    `target`: the sparsity of the level-0 entries, with `inputs="target"`."""
    path = Path(path)
    if inputs not in ("target", "dense"):
        raise LayerpruneError(f"unknown level inputs '{inputs}'; use target or dense")
    if inputs == "target" and pruner != "magnitude":
        if target is None or any(not any(abs(s - target) < 1e-12 for s in ss) for ss in sparsities.values()):
            raise LayerpruneError("inputs='target' needs the target among every layer's sparsities")
    else:
        inputs = "dense"  # magnitude uses no inputs
    if pruner not in SPARSITY_PRUNERS:
        raise LayerpruneError(f"unknown pruner '{pruner}'; use one of {', '.join(SPARSITY_PRUNERS)}")
    if (path / MANIFEST).exists():
        db = LevelDatabase(path)
        db.check(lm, pruner, sparsities, inputs)
        return db
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LayerpruneError(f"{path} exists and is not a level database; choose a new --levels-db folder")
    if pruner != "magnitude" and windows is None:
        raise LayerpruneError(f"{pruner} levels need calibration windows")
    check_destination(path, {"model folder": lm.path}, option="--levels-db")
    adapter = lm.adapter
    fingerprint = lm.fingerprint  # of the dense model, before any block is changed
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps({
        "model": fingerprint, "pruner": pruner, "sparsities": sparsities, "inputs": inputs, "target": target,
        "calibration": None if windows is None or pruner == "magnitude" else windows.fingerprint,
    }))  # fmt: skip
    tmp = _adopt(path, spec)
    done = _finished_blocks(tmp) if tmp is not None else set()
    if tmp is None:
        tmp = temp_dir_beside(path)
        (tmp / BUILD).write_text(json.dumps(spec))
    elif progress:
        print(f"level database: {len(done)} blocks kept from an interrupted build in {tmp.name}", flush=True)
    try:

        def save_block(i: int, stats: SharedStats | None) -> dict:
            tensors = {}
            factors: dict[int, tuple] = {}  # sparsegpt: one factor per shared Hessian, for every level
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
                        new, mask = sparsegpt(W, None, s, factor=shared_factor(stats[role], factors))
                        entry = new.masked_fill(mask, 0.0).to(W.dtype).contiguous().cpu()
                    tensors[f"{role}@{j}"] = entry
            part = tmp / f"block-{i}.safetensors.part"  # renamed when whole: a kill leaves no torn block
            save_file(tensors, str(part))
            os.replace(part, tmp / f"block-{i}.safetensors")
            return tensors

        if pruner == "magnitude":
            for i in range(adapter.num_blocks):
                if i not in done:
                    with adapter.resident(i):
                        save_block(i, None)
        else:

            def on_block(i: int, calibrate) -> None:
                roles = [r for r in adapter.linears(i) if f"{i}.{r}" in sparsities]
                if i in done:  # an interrupted build of the same database finished this block
                    tensors = load_file(str(tmp / f"block-{i}.safetensors"))
                else:
                    stats = SharedStats(roles, ColumnNorms if pruner == "wanda" else Hessian)
                    calibrate(stats)
                    tensors = save_block(i, stats)
                if inputs == "target":  # the next block sees this one pruned at the target
                    for role in roles:
                        j = next(
                            j for j, s in enumerate(sparsities[f"{i}.{role}"]) if abs(s - target) < 1e-12
                        )
                        W = adapter.weight(adapter.linears(i)[role])
                        W.copy_(_entry(tensors, role, j, pruner).to(W.device, W.dtype))

            try:
                run_sequential(lm.model, adapter, windows.input_ids, on_block, batch_size=batch_size,
                               progress=progress, desc=f"{pruner} levels", modifies=inputs == "target")  # fmt: skip
            finally:
                if inputs == "target":
                    _restore(adapter, tmp, sparsities)
        manifest = {
            "format": FORMAT,
            "model": {
                "name": lm.name,
                "fingerprint": fingerprint,
                "num_blocks": adapter.num_blocks,
                "numerics": lm.numerics_key,
            },  # fmt: skip
            "pruner": pruner,
            "kind": "weights" if pruner == "sparsegpt" else "masks",
            "calibration": None if windows is None or pruner == "magnitude" else windows.protocol,
            "inputs": inputs,
            "target": target,
            "layers": {
                name: {"numel": adapter.layer(name).weight.numel(), "sparsities": list(ss)}
                for name, ss in sparsities.items()
            },
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (tmp / BUILD).unlink()
        publish(tmp)
        if path.exists():  # an empty folder made for it
            path.rmdir()
        tmp.rename(path)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the finished blocks stay for the next build to take over
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LevelDatabase(path)


BUILD = "build.json"  # in a build's folder: what its blocks are computed from


def _adopt(path: Path, spec: dict) -> Path | None:
    """The folder of a killed build of the same database, taken over (renamed to a name of this
    process: of two reruns at once, one wins the rename); None if there is none. The killed builds'
    folders of anything else are removed."""
    found = None
    for old in stale(path.parent, beside_pattern(path, "tmp")):
        try:
            same = json.loads((old / BUILD).read_text()) == spec
        except (OSError, ValueError):
            same = False
        if same:
            mine = path.parent / f".{path.name}.{owner_tag()}.{secrets.token_hex(4)}.tmp"
            try:
                os.rename(old, mine)
            except OSError:
                continue
            found = mine
            break
    remove_stale(path)
    return found


def _finished_blocks(folder: Path) -> set[int]:
    """The blocks of a build's folder that are complete (a torn `.part` is discarded)."""
    from safetensors import safe_open

    done = set()
    for f in folder.glob("block-*.safetensors"):
        try:
            with safe_open(str(f), framework="pt"):
                done.add(int(f.name.split("-")[1].split(".")[0]))
        except Exception:  # noqa: BLE001 - an unreadable block is computed again
            f.unlink(missing_ok=True)
    for f in folder.glob("*.part"):
        f.unlink(missing_ok=True)
    return done


def _entry(tensors: dict, role: str, j: int, pruner: str) -> torch.Tensor:
    entry = tensors[f"{role}@{j}"]
    if pruner == "sparsegpt":
        return entry
    return tensors[role].masked_fill(unpack(entry, tensors[role].shape), 0)


@torch.no_grad()
def _restore(adapter, folder: Path, sparsities: dict) -> None:
    """The dense weights back into every layer, from the block files written so far."""
    from safetensors import safe_open

    for i in range(adapter.num_blocks):
        f = folder / f"block-{i}.safetensors"
        if not f.exists():
            continue
        with safe_open(str(f), framework="pt") as st, adapter.resident(i, modifies=True):
            for role, layer in adapter.linears(i).items():
                if f"{i}.{role}" in sparsities:
                    W = adapter.weight(layer)
                    W.copy_(st.get_tensor(role).to(W.device, W.dtype))
