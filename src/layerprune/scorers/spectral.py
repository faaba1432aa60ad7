"""Heavy-tailed spectral metrics of every prunable weight matrix (AlphaPruning's ESD analysis).

For each linear layer of each block: W in float32, eigenvalues of W^T W = svdvals(W)^2, ascending.
Which eigenvalues enter the fit (`filter_zeros`):
- `filter_zeros=False` (the default, as the reference's `net_esd_estimator`): all of them, however
  small; only exact zeros are dropped (ln 0 = -inf would poison the fit, where the reference gives nan).
- `filter_zeros=True`: eigenvalues <= EVALS_THRESH = 1e-5 are dropped as numerically zero (the
  reference's option of that name, and our behaviour before version 2 of the cache). Tiny eigenvalues
  widen the log10 histogram below, which moves the peak bin and hence xmin, so the two settings can
  give different alphas for matrices that have eigenvalues <= 1e-5.

A power law p(l) ~ l^-alpha is fitted to the tail above xmin with the Hill estimator

    alpha(i) = 1 + n / (sum_{k>=i} ln l_k - n ln l_i),   n = N - i,   xmin = l_i

and the Kolmogorov-Smirnov distance D(i) = max_k |1 - (l_{i+k}/xmin)^(1-alpha) - k/n|, k = 0..n-1.

- `xmin_peak` (metric `alpha_peak`, the default): a 100-bin histogram of log10 l; p = 10^(left edge of
  the fullest bin); candidates xmin = l_i between a lower bound and 1.5 p (both bounds in float32, as
  in the reference) are scanned in order and the alpha of the smallest D is kept (the first, if
  tied; a skipped candidate counts as D = 1). The reference compares the *linear* l_i with the
  lower bound log10(0.95 p), a log value: that quirk is the default (`lower_bound="reference"`) so
  that our alphas match the published ones; `lower_bound="corrected"` uses 0.95 p.
- `xmin_mid` (metric `alpha_mid`): one fit at i = N // 2.
Also alpha_hat = alpha_peak * log10(l_max), stable rank = sum(l) / l_max, spectral norm = l_max,
entropy = the spectral entropy of l / sum(l), normalised by ln N (1 = flat spectrum).

The fit over all candidates is vectorised (the reference loops in Python; weightwatcher takes minutes
per 4096^2 matrix). Results are cached per model fingerprint, lower bound and `filter_zeros`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import LayerpruneError
from ..registry import SPECTRAL_METRICS
from .base import MethodScores

METRICS = SPECTRAL_METRICS
EVALS_THRESH = 1e-5  # the reference's threshold for "zero" eigenvalues (used with filter_zeros=True)
MIN_EIGS = 10
CACHE_VERSION = 2  # 2: tiny eigenvalues kept by default (filter_zeros=False); 1 dropped them always


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Squared singular values of W in float32 (as the reference), ascending."""
    return torch.linalg.svdvals(weight.detach().float()).pow(2).sort().values


def hill_alpha(
    eigs: torch.Tensor,
    xmin: str = "peak",
    lower_bound: str = "reference",
    bins: int = 100,
    *,
    filter_zeros: bool = False,
) -> dict:
    """Power-law exponent of an ascending eigenvalue spectrum; see the module docstring.

    filter_zeros=False (the reference's default) keeps every eigenvalue but exact zeros;
    filter_zeros=True drops those <= EVALS_THRESH."""
    if lower_bound not in ("reference", "corrected"):
        raise LayerpruneError(f"unknown lower bound '{lower_bound}'; use reference or corrected")
    eigs = eigs.float().cpu()
    thresh = EVALS_THRESH if filter_zeros else 0.0
    if (eigs <= thresh).any():  # ln 0 = -inf would poison the fit
        eigs = eigs[eigs > thresh]
    N = eigs.numel()
    if N < MIN_EIGS:
        raise LayerpruneError(f"only {N} nonzero eigenvalues: too few to fit a power law (need {MIN_EIGS})")
    logs = eigs.double().log()
    tail = logs.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{k>=i} ln l_k
    n_all = torch.arange(N, 0, -1, dtype=torch.float64)  # n = N - i
    alpha_all = 1 + n_all / (tail - n_all * logs)
    if xmin == "mid":
        i = N // 2
        return {"alpha": float(alpha_all[i]), "xmin": float(eigs[i]), "D": None}
    if xmin != "peak":
        raise LayerpruneError(f"unknown xmin rule '{xmin}'; use peak or mid")
    log10 = eigs.log10()
    lo, hi = float(log10.min()), float(log10.max())
    counts = torch.histc(log10, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    # the bounds in float32 tensor arithmetic, as the reference, so that the comparisons with the
    # float32 eigenvalues below decide exactly as there
    peak = torch.pow(10.0, edges[int(torch.argmax(counts))])
    lower = float(torch.log10(0.95 * peak) if lower_bound == "reference" else 0.95 * peak)
    upper = float(1.5 * peak)
    candidates = []
    for i in range(N - 1):  # the scan order matters: it stops at the first l_i above the upper bound
        x = float(eigs[i])
        if x < lower:
            continue
        if x > upper:
            break
        candidates.append(i)
    D = torch.ones(N - 1, dtype=torch.float64)
    alphas = torch.zeros(N - 1, dtype=torch.float64)
    idx = torch.tensor(candidates, dtype=torch.long)
    if len(candidates):
        a = alpha_all[idx]
        ok = a > 1
        idx, a = idx[ok], a[ok]
        alphas[idx] = a
        j = torch.arange(N, dtype=torch.float64)
        for start in range(0, idx.numel(), 256):  # [chunk, N] at a time
            ci, ca = idx[start : start + 256], a[start : start + 256]
            cdf = 1 - torch.exp((1 - ca[:, None]) * (logs[None, :] - logs[ci, None]))
            emp = (j[None, :] - ci[:, None].double()) / (N - ci[:, None]).double()
            dev = (cdf - emp).abs().masked_fill(j[None, :] < ci[:, None], -1.0)
            D[ci] = dev.max(dim=1).values
    best = int(torch.argmin(D))
    if D[best] >= 1:
        raise LayerpruneError("no xmin candidate gave a valid power-law fit; try --metric alpha_mid")
    return {"alpha": float(alphas[best]), "xmin": float(eigs[best]), "D": float(D[best])}


def matrix_metrics(
    weight: torch.Tensor, lower_bound: str = "reference", *, filter_zeros: bool = False
) -> dict[str, float]:
    eigs = eigenvalues(weight)
    peak = hill_alpha(eigs, "peak", lower_bound, filter_zeros=filter_zeros)
    lmax = float(eigs[-1])
    p = eigs.double() / eigs.double().sum()
    p = p[p > 0]
    return {
        "alpha_peak": peak["alpha"],
        "alpha_mid": hill_alpha(eigs, "mid", filter_zeros=filter_zeros)["alpha"],
        "alpha_hat": peak["alpha"] * math.log10(lmax),
        "stable_rank": float(eigs.double().sum()) / lmax,
        "spectral_norm": lmax,
        "entropy": float(-(p * p.log()).sum() / math.log(eigs.numel())),
        "xmin": peak["xmin"],
        "ks_distance": peak["D"],
    }


def _cache_path(fingerprint: str, lower_bound: str, filter_zeros: bool = False) -> Path:
    from ..io import cache_root

    root = cache_root()
    zeros = "filterzeros" if filter_zeros else "keepzeros"
    return root / "esd" / f"{fingerprint}-{lower_bound}-{zeros}-v{CACHE_VERSION}.json"


def model_metrics(
    model,
    adapter,
    fingerprint: str | None = None,
    lower_bound: str = "reference",
    progress=True,
    *,
    filter_zeros: bool = False,
):
    """{layer name: {metric: value}} for every prunable layer; cached by model fingerprint (one file
    per lower bound and filter_zeros setting)."""
    from tqdm.auto import tqdm

    path = _cache_path(fingerprint, lower_bound, filter_zeros) if fingerprint else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    out = {}
    for i in tqdm(range(adapter.num_blocks), desc="spectra", disable=not progress, leave=False):
        with adapter.resident(i):
            for role, layer in adapter.linears(i).items():
                try:
                    out[f"{i}.{role}"] = matrix_metrics(
                        adapter.weight(layer), lower_bound, filter_zeros=filter_zeros
                    )
                except LayerpruneError as e:
                    raise LayerpruneError(f"layer {i}.{role}: {e}") from None
    if path is not None:
        from ..io import atomic_write_json

        atomic_write_json(path, out)
    return out


def score(
    model,
    adapter,
    windows=None,
    *,
    unit="layer",
    removed=None,
    progress=True,
    metric="alpha_peak",
    lower_bound="reference",
    fingerprint=None,
    filter_zeros=False,
):
    """Importance = -metric per layer (a heavier tail, lower alpha, marks a better-trained layer:
    prune it less). extra: the raw metric per layer and its block means. filter_zeros=True drops
    eigenvalues <= EVALS_THRESH before the fits (the default keeps them, as the reference)."""
    if metric not in METRICS:
        raise LayerpruneError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    table = model_metrics(model, adapter, fingerprint, lower_bound, progress, filter_zeros=filter_zeros)
    names = adapter.layer_names()
    values = [table[n][metric] for n in names]
    per_block = len(adapter.roles)
    blocks = [sum(values[b * per_block : (b + 1) * per_block]) / per_block for b in range(adapter.num_blocks)]
    return MethodScores(
        [-v for v in values],
        {
            "metric": metric,
            "metric_values": values,
            "block_values": blocks,
            "lower_bound": lower_bound,
            "filter_zeros": filter_zeros,
            "all_metrics": table,
        },
    )
