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


def calibration(lm, source=None, samples=DEPTH_SAMPLES, seqlen=DEPTH_SEQLEN, seed=0, bos=None) -> Windows:
    context = lm.adapter.context_length
    seqlen = min(seqlen, context) if context and seqlen is None else seqlen
    check_seqlen(seqlen, context)
    text = load_text(source or default_calibration_source(lm), default_split="train")
    return calibration_windows(
        lm.tokenizer, text, samples, seqlen, seed, bos or default_bos(lm.tokenizer, lm.adapter)
    )


def run(
    lm, method: str, windows: Windows, *, unit: str = "block", removed=None, progress=True, **params
) -> Scores:
    fn = scorer(method)
    lm.adapter.units(unit)  # an unsupported granularity fails here, before any work
    t0 = time.perf_counter()
    result = fn(lm.model, lm.adapter, windows, unit=unit, removed=removed, progress=progress, **params)
    seconds = time.perf_counter() - t0
    public = {k: v for k, v in params.items() if k != "store"}
    return Scores(
        method=method,
        unit=unit,
        units=[str(u) for u in lm.adapter.units(unit)],
        importance=result.importance,
        model=model_info(lm),
        params=public,
        calibration=windows.protocol,
        seconds=seconds,
        extra=result.extra,
        provenance=stamp(),
    )
