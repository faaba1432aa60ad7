"""layerprune: decide, layer by layer, how to prune a causal LM; apply, recover and measure it.

    import layerprune as lp
    lm = lp.load("fixture")                           # a local folder, a hub id, or the bundled model
    calib = lp.calibration(lm, "fixture:val", samples=10, seqlen=128)
    scores = lp.score(lm, "ppl", calib)                # importance of each block
    plan = lp.plan(lm, scores, remove=3)               # a DepthPlan; lp.plan(lm, sparsity=0.7, ...) too
    lp.apply(lm, plan)                                 # checked against the model, pruned in place
    lp.recover(lm, "fixture:train", steps=200)         # LoRA (peft), merged back; method="full": CPT
    lp.export(lm, "pruned/", plan)                     # a standard checkpoint, written atomically
    lp.export_gguf("pruned/", "pruned.gguf")           # GGUF for llama.cpp, by llama.cpp's converter
    lp.perplexity(lm, "fixture:test", seqlen=128).ppl

The folders show the pipeline: scorers/, planners/, pruners/, evaluation/, reports/; the verbs above
live in api.py and are what the CLI calls.
"""

__version__ = "0.1.0"

_LAZY = {
    # the verbs, in pipeline order
    "load": "layerprune.models.loading",
    "calibration": "layerprune.data",
    "score": "layerprune.api",
    "plan": "layerprune.api",
    "apply": "layerprune.api",
    "recover": "layerprune.recovery",
    "export": "layerprune.checkpoint",
    "export_gguf": "layerprune.api",
    "perplexity_gguf": "layerprune.api",
    "perplexity": "layerprune.evaluation.perplexity",
    "report": "layerprune.reports.compare",
    # the types a user keeps or passes
    "Scores": "layerprune.scorers.base",
    "Plan": "layerprune.plans",
    "DepthPlan": "layerprune.plans",
    "SparsityPlan": "layerprune.plans",
    "WidthPlan": "layerprune.plans",
    "LoadedModel": "layerprune.models.loading",
    "Windows": "layerprune.data",
    "LayerpruneError": "layerprune.errors",
    # lower-level parts
    "ModelAdapter": "layerprune.models.adapter",
    "Unit": "layerprune.models.adapter",
    "load_text": "layerprune.data",
    "calibration_windows": "layerprune.data",
    "eval_windows": "layerprune.data",
    "MaskEvaluator": "layerprune.engine.masked",
    "EvalStore": "layerprune.engine.store",
}


def __getattr__(name: str):
    # Lazy so that `layerprune --help` does not pay for importing torch and transformers.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = list(_LAZY)
