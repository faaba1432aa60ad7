"""FLAP (An et al., AAAI 2024): the fluctuation of the inputs of the output projections.

One pass of the dense model over the calibration windows, block by block (the sequential engine,
nothing pruned on the way), records for every input feature j of each block's attention output
projection (o) and MLP output projection (down) the token mean and the fluctuation:

    fluctuation_j = sample variance of X_j over all calibration tokens (Bessel's N - 1, the paper's
                    1 / (N - 1) sum_n (X_nj - mean_j)^2)
    WIFV_j        = fluctuation_j * ||W[:, j]||^2       (W: the o / down weight, rows = outputs)

`fluctuation="reference"` computes instead what the reference code's `BiasGPT.add_batch` does:
one update per calibration window, in order, with the running mean after that window in place of
both the old and the new mean (the code's "old" mean aliases the tensor it updates in place), the
first window contributing nothing, and counts of windows rather than tokens. For T-token windows
that is about T times the sample variance; its ranking can differ slightly from the paper's.

What a unit scores (higher = more important):
- a KV group (one KV head with the query heads that share it; one head per group without GQA):
  the sum of WIFV_j^2 over the o features its query heads write. The reference squares the head
  metric before anything else and sums it over a head's features; summing over a group's query
  heads ranks groups as FLAP ranks heads;
- an MLP channel: its WIFV.

`extra`: "groups" and "channels" (one list per block, like wanda-sp, so every width allocation can
use them), "attn_features" (WIFV of every o input feature: the `flap` allocation standardizes
these), "means" {"attn": o input means, "mlp": down input means} per block (the bias compensation
of the removed features), and "fluctuation".
"""

from __future__ import annotations

import torch

from ..engine.sequential import run_sequential
from ..errors import LayerpruneError
from ..models.width import layout
from .base import MethodScores

FLUCTUATIONS = ("sample", "reference")


class Fluctuation:
    """Token mean and sample variance (N - 1) of every input feature, merged micro-batch by
    micro-batch (Chan et al.'s pairwise update) in float64."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        nb = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n

    def variance(self) -> torch.Tensor:
        if self.n < 2:
            raise LayerpruneError("FLAP's fluctuation needs at least 2 calibration tokens")
        return self.m2 / (self.n - 1)


class ReferenceFluctuation:
    """The reference code's running estimate, window by window (see the module docstring)."""

    def __init__(self):
        self.windows = 0
        self.mean: torch.Tensor | None = None
        self.fluc: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x[None]
        for w in x:  # one calibration window: [tokens, features]
            k = self.windows
            if self.mean is None:
                self.mean = torch.zeros_like(w[0])
            self.mean = self.mean * (k / (k + 1)) + w.mean(0) / (k + 1)
            if k == 0:
                self.fluc = torch.zeros_like(self.mean)
            else:
                self.fluc = self.fluc * ((k - 1) / k) + (w - self.mean).pow(2).sum(0) / (k + 1)
            self.windows += 1

    def variance(self) -> torch.Tensor:
        if self.windows < 2:
            raise LayerpruneError("FLAP's reference fluctuation needs at least 2 calibration windows")
        return self.fluc


def flap_table(model, adapter, windows, *, fluctuation: str, batch_size: int, progress: bool) -> dict:
    if fluctuation not in FLUCTUATIONS:
        raise LayerpruneError(f"unknown fluctuation '{fluctuation}'; use one of {', '.join(FLUCTUATIONS)}")
    if not adapter.has_parts():
        raise LayerpruneError(
            f"{adapter.spec.name} blocks have no attention / MLP split: width pruning needs one"
        )
    outputs = adapter.spec.output_roles  # part -> role: o, down
    stat = Fluctuation if fluctuation == "sample" else ReferenceFluctuation
    out: dict = {"groups": [], "channels": [], "attn_features": [], "means": {"attn": [], "mlp": []}}

    def on_block(i, calibrate):
        stats = {role: stat() for role in outputs.values()}
        calibrate(lambda role, x: stats[role].add(x) if role in stats else None)
        linears = adapter.linears(i)
        wifv = {}
        for part, role in outputs.items():
            w = adapter.weight(linears[role]).detach().double()
            wifv[part] = stats[role].variance() * w.pow(2).sum(0)
            out["means"][part].append(stats[role].mean.tolist())
        _, idx = layout(adapter, i, "attn")[outputs["attn"]]
        out["groups"].append(wifv["attn"].pow(2)[idx].sum(1).tolist())  # .tolist(): one transfer each
        out["attn_features"].append(wifv["attn"].tolist())
        out["channels"].append(wifv["mlp"].tolist())

    run_sequential(
        model,
        adapter,
        windows.input_ids,
        on_block,
        batch_size=batch_size,
        progress=progress,
        desc="flap",
        modifies=False,
    )
    out["fluctuation"] = fluctuation
    return out


def score(
    model, adapter, windows, *, unit="module", removed=None, batch_size=8, progress=True, fluctuation="sample"
) -> MethodScores:
    if unit != "module":
        raise LayerpruneError("FLAP scores are per attention / MLP part; use --unit module")
    if removed is not None and any(removed):
        raise LayerpruneError("FLAP scores are computed once on the dense model; drop --iterative")
    table = flap_table(
        model, adapter, windows, fluctuation=fluctuation, batch_size=batch_size, progress=progress
    )
    importance = [
        sum(v) for i in range(adapter.num_blocks) for v in (table["groups"][i], table["channels"][i])
    ]
    return MethodScores(importance, table)
