"""The main job on the bundled model, top to bottom: the pipeline a user runs, as library calls.

    layerprune demo -o runs/demo

score (leave-one-out perplexity) -> plan (remove 3 of 12 blocks) -> apply -> export a checkpoint
-> evaluate dense and pruned on held-out text -> results.json, PNG charts, a sample generation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .api import apply, calibration, export, load, perplexity, plan, score
from .io import atomic_write_json
from .provenance import stamp
from .reports.plots import importance_chart

PROMPT = "And God said,"


def _generate(lm, prompt: str, tokens: int = 24) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def demo(
    out: str | Path,
    method: str = "ppl",
    remove: int = 3,
    seqlen: int = 128,
    eval_windows: int | None = None,
    quiet: bool = False,
) -> dict:
    """`eval_windows`: evaluate on the first N windows of fixture:test only (default: all of it)."""
    out = Path(out)
    progress = not quiet
    t0 = time.perf_counter()
    lm = load("fixture", device="cpu", quiet=quiet)
    print(
        f"[1/6] loaded fixture: {lm.adapter.spec.name}, {lm.adapter.num_blocks} blocks, "
        f"{sum(p.numel() for p in lm.model.parameters()):,} parameters"
    )

    dense = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=progress)
    print(f"[2/6] dense perplexity on fixture:test (seqlen {seqlen}): {dense.ppl:.3f}")
    dense_text = _generate(lm, PROMPT)

    windows = calibration(lm)  # 10 samples x 128 tokens of fixture:val, seed 0
    scores = score(lm, method, windows, progress=progress)
    scores.save(out / "scores.json")
    importance_chart(scores, out / "scores.png")
    print(
        f"[3/6] {method} importance per block ({scores.seconds:.1f}s): "
        + ", ".join(f"{u}:{v:.4g}" for u, v in zip(scores.units, scores.importance))
    )

    depth_plan = plan(lm, scores, remove=remove)
    depth_plan.save(out / "plan.json")
    importance_chart(scores, out / "plan.png", removed=depth_plan.remove)
    print(f"[4/6] plan: remove blocks {', '.join(depth_plan.remove)}")

    counts = apply(lm, depth_plan)
    pruned = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=progress)
    pruned_text = _generate(lm, PROMPT)
    print(
        f"[5/6] pruned: {counts['blocks_after']} blocks, {counts['parameters_after']:,} parameters, "
        f"perplexity {pruned.ppl:.3f} (dense {dense.ppl:.3f})"
    )

    export(
        lm, out / "model", depth_plan, {"pruning": counts, "evaluation": [pruned.to_dict()]}, overwrite=True
    )
    results = {
        "dense": dense.to_dict(),
        "pruned": pruned.to_dict(),
        "plan": depth_plan.remove,
        "pruning": counts,
        "scores_seconds": scores.seconds,
        "generation": {"prompt": PROMPT, "dense": dense_text, "pruned": pruned_text},
        "seconds": time.perf_counter() - t0,
        **stamp(),
    }
    atomic_write_json(out / "results.json", results)
    print(
        f"[6/6] wrote {out}/model (loads with AutoModelForCausalLM.from_pretrained), results.json, plan.json, PNGs"
    )
    print(f"      '{PROMPT}' dense : {dense_text!r}")
    print(f"      '{PROMPT}' pruned: {pruned_text!r}")
    return results
