"""OWL's layer outlier distribution: per block, the share of Wanda scores |W_ij| * ||X_j|| above M
times their mean, all linear layers of the block pooled (as the reference), in percent.

Statistics come from the dense model, block by block (nothing is pruned). Importance = the outlier
ratio: more outliers, more important, pruned less.
"""

from __future__ import annotations

import torch

from ..engine.sequential import ColumnNorms, SharedStats, run_sequential
from .base import MethodScores


def score(
    model,
    adapter,
    windows,
    *,
    unit="block",
    removed=None,
    batch_size=8,
    progress=True,
    hyper_m=5.0,
    offload="memory",
):
    ratios: list[float] = []

    def on_block(i, calibrate):
        norms = SharedStats(adapter.roles, ColumnNorms)
        calibrate(norms)
        scores = torch.cat(
            [
                (adapter.weight(layer).abs().float() * norms[r].norms()[None, :]).reshape(-1)
                for r, layer in adapter.linears(i).items()
            ]
        )
        ratios.append(float((scores > hyper_m * scores.mean()).float().mean() * 100))

    run_sequential(
        model,
        adapter,
        windows.input_ids,
        on_block,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
        desc="outliers",
        modifies=False,
    )
    return MethodScores(ratios, {"hyper_m": hyper_m, "outlier_ratio_percent": ratios})
