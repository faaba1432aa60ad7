"""Unstructured and N:M pruning of linear layers: magnitude, Wanda, SparseGPT, block by block.

Every pruner applies a sparsity plan (a target per layer) through the shared sequential engine:
statistics of block i are gathered on the inputs produced by the already pruned blocks before it,
as in the reference implementations of Wanda and SparseGPT.

- magnitude: remove the smallest |W| of the whole matrix (exactly int(numel * s) weights; the
  reference's `<= threshold` removes one more, plus ties);
- wanda: score |W_ij| * ||X_j||_2, remove the lowest int(in * s) scores of every output row;
- sparsegpt: OBS with the layer Hessian H = 2 X X^T / n, dampening 1% of mean(diag H), columns in
  blocks of 128; in each block the mask is chosen by w^2 / d_j on the updated weights, d_j = [H[j:, j:]^-1]_00 (the squared diagonal of the upper Cholesky factor of H^-1), then the
  remaining weights absorb the error;
- N:M (every pruner): in each row, every group of M consecutive input columns loses its N lowest
  scores (N zeros out of M; 2:4 and 4:8 are 50%). A per-layer target s becomes N = round(s * M).
"""

from __future__ import annotations

import torch

from ..engine.sequential import ColumnNorms, Hessian, run_sequential
from ..errors import LayerpruneError
from ..registry import SPARSITY_PRUNERS, nm_for

PRUNERS = SPARSITY_PRUNERS  # the names plans and the CLI use (registry.py); implemented in prune()


def lowest_mask(scores: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """True at the k lowest scores of each row (per_row) or of the whole matrix; ties: lower index."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous, even for W.T
    if k <= 0:
        return mask
    if per_row:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        return mask.scatter_(1, idx, True)
    idx = torch.sort(scores.reshape(-1), stable=True).indices[:k]
    return mask.view(-1).index_fill_(0, idx, True).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n lowest scores of every group of m consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise LayerpruneError(f"a layer with {cols} inputs cannot be cut in groups of {m}; use another --nm")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, idx, True).reshape(rows, cols)


def magnitude(weight: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    scores = weight.abs().float()
    return nm_mask(scores, *nm) if nm else lowest_mask(scores, int(weight.numel() * sparsity), per_row=False)


ROWS = 256  # Wanda's mask is per row: built a slice of rows at a time, its scores and sort stay small


def wanda(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    k = int(weight.shape[1] * sparsity)
    for r in range(0, weight.shape[0], ROWS):
        scores = weight[r : r + ROWS].abs().float() * column_norms[None, :]
        mask[r : r + ROWS] = nm_mask(scores, *nm) if nm else lowest_mask(scores, k, per_row=True)
    return mask


def sparsegpt(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm=None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, mask). Our implementation of SparseGPT's column-block OBS reconstruction."""
    W = weight.detach().float().clone()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError:
        raise LayerpruneError(
            "the layer Hessian is not positive definite: use more calibration text"
        ) from None
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diag(U1).pow(2)
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        if nm is None:
            M1 = lowest_mask(W1.pow(2) / d2[None, :], int(W1.numel() * sparsity), per_row=False)
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                M1[:, i : i + nm[1]] = nm_mask(W1[:, i : i + nm[1]].pow(2) / d2[None, i : i + nm[1]], *nm)
            w = W1[:, i]
            q = w.masked_fill(M1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
        mask[:, i1:i2] = M1
    return W, mask


@torch.no_grad()
def prune(
    model,
    adapter,
    input_ids: torch.Tensor,
    targets: dict[str, float],
    pruner: str,
    nm: tuple[int, int] | None = None,
    *,
    batch_size: int = 8,
    offload: str = "memory",
    progress: bool = True,
) -> dict[str, float]:
    """Prune every layer named in `targets` ('block.role' -> sparsity); return achieved sparsities."""
    if pruner not in PRUNERS:
        raise LayerpruneError(f"unknown pruner '{pruner}'; use one of {', '.join(PRUNERS)}")
    achieved: dict[str, float] = {}

    def prune_layer(i: int, role: str, layer, stats) -> None:
        name = f"{i}.{role}"
        s = targets[name]
        pattern = nm_for(s, nm) if nm else None
        W = adapter.weight(layer)
        if pruner == "magnitude":
            mask = magnitude(W, s, pattern)
            W.masked_fill_(mask, 0.0)
        elif pruner == "wanda":
            mask = wanda(W, stats.norms(), s, pattern)
            W.masked_fill_(mask, 0.0)
        else:
            new, mask = sparsegpt(W, stats.value(), s, pattern)
            W.copy_(new.masked_fill(mask, 0.0).to(W.dtype))
        achieved[name] = float((W == 0).float().mean())

    def on_block(i: int, calibrate) -> None:
        layers = {r: layer for r, layer in adapter.linears(i).items() if f"{i}.{r}" in targets}
        if not layers:
            return
        if pruner == "magnitude":  # needs no data
            for role, layer in layers.items():
                prune_layer(i, role, layer, None)
            return
        stats = {r: ColumnNorms() if pruner == "wanda" else Hessian() for r in layers}
        calibrate(lambda role, x: stats[role].add(x) if role in stats else None)
        for role, layer in layers.items():
            prune_layer(i, role, layer, stats[role])

    if pruner == "magnitude" or input_ids is None:  # magnitude needs no data
        if pruner != "magnitude":
            raise LayerpruneError(f"{pruner} needs calibration windows")
        for i in range(adapter.num_blocks):
            with adapter.resident(i, modifies=True):
                on_block(i, None)
        return achieved
    run_sequential(
        model,
        adapter,
        input_ids,
        on_block,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
        desc=pruner,
        split_data=True,  # under torchrun: windows split over ranks, statistics all-reduced
    )
    return achieved


def apply(lm, plan, windows, *, batch_size: int = 8, offload: str = "memory", progress: bool = True) -> dict:
    """Apply a sparsity plan to the loaded model in place; return the per-layer report."""
    from ..plans import SparsityPlan

    if not isinstance(plan, SparsityPlan):
        raise LayerpruneError(
            f"this is a {plan.kind} plan, not a sparsity plan; apply it with layerprune.apply"
        )
    plan.check(lm)
    nm = tuple(plan.nm) if plan.nm else None
    ids = windows.input_ids if windows is not None else None
    achieved = prune(
        lm.model,
        lm.adapter,
        ids,
        plan.layers,
        plan.pruner,
        nm,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
    )
    lm.modified()
    numel = {n: lm.adapter.layer(n).weight.numel() for n in achieved}
    total = sum(numel.values())
    return {
        "pruner": plan.pruner,
        "nm": plan.nm,
        "target": plan.target,
        "achieved_mean_sparsity": sum(achieved[n] * numel[n] for n in achieved) / total,
        "layers": {n: {"target": plan.layers[n], "achieved": achieved[n]} for n in achieved},
        "note": "zeros stored densely: no memory saving or speed-up without sparse kernels",
    }
