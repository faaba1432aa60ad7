"""Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers").

d(l, n) = arccos(cos(x_l, x_{l+n})) / pi on the last token of each sequence, averaged over sequences,
with x_l the input of block l (x_L the output of the last block, before the final norm). Removing
the n blocks l..l+n-1 where d(l, n) is smallest keeps the representation most nearly unchanged.

The importance of block l is d(l, 1); `extra["spans"][n]` holds d(l, n) for every l, which the
planner uses to cut one contiguous span of n blocks.
"""

from __future__ import annotations

import math

import torch

from ..engine.masked import BlockRunner
from ..errors import LayerpruneError
from .base import MethodScores


def score(model, adapter, windows, *, unit="block", removed=None, batch_size=16, progress=True):
    if unit != "block":
        raise LayerpruneError("angular scores whole blocks; use --unit block")
    if removed is not None and any(removed):
        raise LayerpruneError("angular distance picks one contiguous span in one shot; drop --iterative")
    L = adapter.num_blocks
    runner = BlockRunner(model, adapter, windows.input_ids, batch_size)
    states = runner.embed()
    last = [torch.cat([h[:, -1].double() for h in states])]
    for i in range(L):
        states = runner.block(i, states)
        last.append(torch.cat([h[:, -1].double() for h in states]))
    x = torch.stack(last)  # [L+1, N, d]
    x = x / x.norm(dim=-1, keepdim=True)
    cos = torch.einsum("and,bnd->abn", x, x).clamp(-1, 1)  # [L+1, L+1, N]
    dist = (torch.arccos(cos) / math.pi).mean(dim=-1)
    spans = {str(n): [float(dist[s, s + n]) for s in range(L - n + 1)] for n in range(1, L)}
    return MethodScores(spans["1"], {"spans": spans})
