"""Block influence (ShortGPT): BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}).

x_i is the input of block i and x_{i+1} its output, taken from the block-by-block runner, not from
HF's `output_hidden_states`, whose last entry is after the final norm and would bias the last block.
"""

from __future__ import annotations

import torch

from ..engine.masked import BlockRunner
from ..errors import LayerpruneError
from .base import MethodScores, keep_mask


def score(model, adapter, windows, *, unit="block", removed=None, batch_size=16, progress=True):
    if unit != "block":
        raise LayerpruneError("bi scores whole blocks; use --unit block")
    L = adapter.num_blocks
    keep = keep_mask(L, removed)
    runner = BlockRunner(model, adapter, windows.input_ids, batch_size)
    states = runner.embed()
    cos_sum = torch.zeros(L, dtype=torch.float64)
    for i in range(L):
        if not keep[i]:
            continue
        out = runner.block(i, states)
        for h, o in zip(states, out):
            cos_sum[i] += float(
                torch.nn.functional.cosine_similarity(h.float(), o.float(), dim=-1).double().sum()
            )
        states = out
    tokens = windows.input_ids.numel()
    importance = [float(1 - cos_sum[i] / tokens) if keep[i] else None for i in range(L)]
    return MethodScores(importance, {"tokens": tokens})
