"""Run a scorer on a loaded model: calibration windows in, a Scores document out."""

from __future__ import annotations

import time

from ..data import Windows, calibration_windows, check_seqlen, default_bos, load_text
from ..provenance import stamp
from . import scorer
from .base import Scores

# The depth-pruning papers calibrate on 10 samples x 128 tokens of BookCorpus (Shortened LLaMA,
# Cooperative Game); our offline default for the bundled model is its validation text.
DEPTH_SAMPLES, DEPTH_SEQLEN = 10, 128


def default_calibration_source(lm) -> str:
    return "fixture:val" if lm.name == "fixture" else "bookcorpus"


def model_info(lm) -> dict:
    return {
        "name": lm.name,
        "fingerprint": lm.fingerprint,
        "architecture": lm.adapter.spec.name,
        "num_blocks": lm.adapter.num_blocks,
    }


# Wanda, SparseGPT and AlphaPruning calibrate on 128 samples x 2048 tokens of C4 (seed 0), scaled
# down to the model's context for small models.
SPARSITY_SAMPLES, SPARSITY_SEQLEN = 128, 2048


def calibration(
    lm, source=None, samples=DEPTH_SAMPLES, seqlen=DEPTH_SEQLEN, seed=0, bos=None, default_source=None
) -> Windows:
    context = lm.adapter.context_length
    if seqlen is None:
        seqlen = min(SPARSITY_SEQLEN, context or SPARSITY_SEQLEN)
    check_seqlen(seqlen, context)
    text = load_text(source or default_source or default_calibration_source(lm), default_split="train")
    return calibration_windows(
        lm.tokenizer, text, samples, seqlen, seed, bos or default_bos(lm.tokenizer, lm.adapter)
    )


def unit_names(adapter, unit: str) -> list[str]:
    """Blocks ('3'), attention / MLP parts ('3.attn'), or linear layers ('3.q')."""
    if unit == "layer":
        return adapter.layer_names()
    return [str(u) for u in adapter.units(unit)]


def run(
    lm, method: str, windows: Windows | None, *, unit: str = "block", removed=None, progress=True, **params
) -> Scores:
    fn = scorer(method)
    if method == "alpha":  # per linear layer, data-free, cached by fingerprint
        unit, params = "layer", {**params, "fingerprint": lm.fingerprint}
    names = unit_names(lm.adapter, unit)  # an unsupported granularity fails here, before any work
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
