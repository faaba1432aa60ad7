"""Measuring a model: perplexity (perplexity.py), zero-shot accuracy through lm-eval (zeroshot.py)."""


def results_document(lm, model: str, perplexity: list[dict], zeroshot: dict | None, **extra) -> dict:
    """What `layerprune eval -o` writes, and what `layerprune report` reads next to a model."""
    from ..provenance import stamp

    return {
        "model": model,
        "model_path": str(lm.path) if lm.path else None,
        "model_fingerprint": lm.fingerprint,
        "numerics": lm.numerics,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        **extra,
        "perplexity": perplexity,
        "zeroshot": zeroshot,
        **stamp(),
    }
