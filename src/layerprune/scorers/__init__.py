"""Importance scorers. `METHODS` maps a method name to its module; see score/base.py for the contract."""

from __future__ import annotations

import importlib

from ..registry import WIDTH_PRUNERS

DEPTH_METHODS = ("ppl", "taylor", "bi", "angular", "sleb", "shapley")
SPARSITY_METHODS = ("alpha", "owl")
WIDTH_METHODS = WIDTH_PRUNERS  # scores of KV groups and channels, named as the width pruners
DATA_FREE = ("alpha", "magnitude-sp")
# The kind of plan each method's scores can feed: depth scores rank units to remove; sparsity scores
# (per-layer heavy-tail metrics, per-block outlier ratios) feed a per-layer sparsity allocation.
FEEDS = {
    **{m: "depth" for m in DEPTH_METHODS},
    **{m: "sparsity" for m in SPARSITY_METHODS},
    **{m: "width" for m in WIDTH_METHODS},
}


def scorer(method: str):
    from ..errors import LayerpruneError

    modules = {
        "ppl": "ppl",
        "taylor": "taylor",
        "bi": "influence",
        "angular": "angular",
        "sleb": "sleb",
        "shapley": "shapley",
        "alpha": "spectral",
        "owl": "outliers",
        "wanda-sp": "structured:score_wanda_sp",
        "magnitude-sp": "structured:score_magnitude_sp",
        "flap": "flap",
    }
    if method not in modules:
        raise LayerpruneError(f"unknown scoring method '{method}'; use one of {', '.join(modules)}")
    module, _, fn = modules[method].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn or "score")
