"""Run a scorer on a loaded model: calibration windows in, a Scores document out."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from ..data import Windows
from ..errors import LayerpruneError
from ..options import accepted
from ..provenance import stamp
from . import DATA_FREE, FEEDS, scorer
from .base import Scores

# Options that a method may not need; passing them to it is not an error.
GENERIC = ("batch_size", "seed", "offload")


def model_info(lm) -> dict:
    return {
        "name": lm.name,
        "fingerprint": lm.fingerprint,
        "architecture": lm.adapter.spec.name,
        "num_blocks": lm.adapter.num_blocks,
        **lm.numerics,  # dtype and device type: what the numbers were computed in
    }


def unit_names(adapter, unit: str) -> list[str]:
    """Blocks ('3'), attention / MLP parts ('3.attn'), or linear layers ('3.q')."""
    if unit == "layer":
        return adapter.layer_names()
    return [str(u) for u in adapter.units(unit)]


def run(
    lm, method: str, windows: Windows | None, *, unit: str = "block", removed=None, progress=True, **params
) -> Scores:
    """Score every unit of the loaded model with `method`; `params` are the method's options."""
    fn = scorer(method)
    params = accepted(fn, params, f"scoring method {method}", GENERIC, flags={"ratio": "--target-ratio"})
    if method == "alpha":  # per linear layer, data-free, cached by fingerprint
        # the weights' dtype and the device change the spectra: they are part of the cache's key
        unit, params, windows = (
            "layer",
            {**params, "fingerprint": f"{lm.fingerprint}-{lm.numerics_key}"},
            None,
        )
    elif FEEDS[method] == "width":  # per attention / MLP part, scores per group and channel inside
        unit = "module"
        windows = None if method in DATA_FREE else windows
    if windows is None and method not in DATA_FREE:
        raise LayerpruneError(f"{method} scores need calibration windows (layerprune.calibration)")
    names = unit_names(lm.adapter, unit)  # an unsupported granularity fails here, before any work
    with contextlib.ExitStack() as stack:
        if isinstance(params.get("store"), (str, Path)):  # a path: the store of this model and data
            from ..distributed import is_main
            from ..engine.store import EvalStore

            if is_main():  # under torchrun rank 0 owns the store; the others get its values
                store = EvalStore(
                    params["store"], lm.fingerprint, windows.fingerprint, windows.protocol, lm.numerics_key
                )
                params["store"] = stack.enter_context(store)
            else:
                params["store"] = None
        t0 = time.perf_counter()
        result = fn(lm.model, lm.adapter, windows, unit=unit, removed=removed, progress=progress, **params)
        seconds = time.perf_counter() - t0
    public = {k: v for k, v in params.items() if k not in ("store", "fingerprint")}
    return Scores(
        method=method,
        unit=unit,
        units=names,
        importance=result.importance,
        model=model_info(lm),
        params=public,
        calibration=windows.protocol if windows is not None else None,
        seconds=seconds,
        extra=result.extra,
        provenance=stamp(),
    )
