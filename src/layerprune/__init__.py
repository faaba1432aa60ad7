"""layerprune: decide, layer by layer, how to prune a causal LM; apply, recover and measure it.

import layerprune as lp
lm = lp.load("fixture")                       # a local folder, a hub id, or the bundled model
lp.perplexity(lm, "fixture:test", seqlen=128).ppl
with lm.adapter.skip([1, 1, 0, 1, ...]):      # blocks as identity, no weight copied
    ...
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("layerprune.models.loading", "load"),
    "LoadedModel": ("layerprune.models.loading", "LoadedModel"),
    "ModelAdapter": ("layerprune.models.adapter", "ModelAdapter"),
    "Unit": ("layerprune.models.adapter", "Unit"),
    "perplexity": ("layerprune.evaluation.perplexity", "perplexity"),
    "load_text": ("layerprune.data", "load_text"),
    "calibration_windows": ("layerprune.data", "calibration_windows"),
    "eval_windows": ("layerprune.data", "eval_windows"),
    "MaskEvaluator": ("layerprune.engine.masked", "MaskEvaluator"),
    "EvalStore": ("layerprune.engine.store", "EvalStore"),
    "LayerpruneError": ("layerprune.errors", "LayerpruneError"),
}


def __getattr__(name: str):
    # Lazy so that `layerprune --help` does not pay for importing torch and transformers.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'layerprune' has no attribute {name!r}")


__all__ = list(_LAZY)
