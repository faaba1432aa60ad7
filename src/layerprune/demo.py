"""The main job on the bundled model, top to bottom: the pipeline a user runs, as library calls.

    layerprune demo -o runs/demo

Two pruned models and a recovered one, measured and compared:
score (leave-one-out perplexity) -> plan (remove 3 of 12 blocks) -> apply -> export `model/`;
Wanda at 50% sparsity -> export `wanda50/`; LoRA on fixture:train for the depth-pruned model ->
`model+lora/`; held-out perplexity and zero-shot accuracy (the bundled lm-eval tasks) of the dense
and every pruned model -> `evals/`; one side-by-side report -> `report/report.md` and `.html`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .api import apply, calibration, export, load, perplexity, plan, score
from .io import atomic_write_json
from .provenance import stamp
from .reports.plots import importance_chart, loss_chart

PROMPT = "And God said,"


def _generate(lm, prompt: str, tokens: int = 24) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _evaluate(lm, label: str, folder: Path, seqlen, eval_windows, zeroshot_limit, progress) -> dict:
    """Held-out perplexity and zero-shot accuracy, written as an eval results file (what
    `layerprune eval -o` writes), which the report reads."""
    from .evaluation import results_document
    from .evaluation.zeroshot import zeroshot

    ppl = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=progress)
    zs = zeroshot(lm, "fixture", limit=zeroshot_limit, progress=progress)
    name = str(lm.path) if label != "dense" else "fixture"
    atomic_write_json(folder / f"{label}.json", results_document(lm, name, [ppl.to_dict()], zs))
    tasks = ", ".join(f"{t} {v[v['metric']]:.3f}" for t, v in zs["tasks"].items())
    print(f"      {label:<10} perplexity {ppl.ppl:8.3f}   zero-shot {tasks} (mean {zs['mean']:.3f})")
    return {"ppl": ppl.ppl, "zeroshot_mean": zs["mean"], "zeroshot": zs["tasks"]}


def demo(
    out: str | Path,
    method: str = "ppl",
    remove: int = 3,
    seqlen: int = 128,
    eval_windows: int | None = None,
    zeroshot_limit: int | None = None,
    sparsity: float = 0.5,
    sparsity_samples: int = 128,
    recover_steps: int = 100,
    quiet: bool = False,
) -> dict:
    """`eval_windows`: evaluate on the first N windows of fixture:test only (default: all of it);
    `zeroshot_limit`: the first N examples of each zero-shot task (default: all)."""
    from .recovery import recover

    out = Path(out)
    progress = not quiet
    t0 = time.perf_counter()
    evals = out / "evals"
    measure = {"seqlen": seqlen, "eval_windows": eval_windows, "zeroshot_limit": zeroshot_limit}
    lm = load("fixture", device="cpu", quiet=quiet)
    print(
        f"[1/7] loaded fixture: {lm.adapter.spec.name}, {lm.adapter.num_blocks} blocks, "
        f"{sum(p.numel() for p in lm.model.parameters()):,} parameters; dense model:"
    )
    measured = {"dense": _evaluate(lm, "dense", evals, progress=progress, **measure)}
    dense_text = _generate(lm, PROMPT)

    windows = calibration(lm)  # 10 samples x 128 tokens of fixture:val, seed 0
    scores = score(lm, method, windows, progress=progress)
    scores.save(out / "scores.json")
    importance_chart(scores, out / "scores.png")
    print(
        f"[2/7] {method} importance per block ({scores.seconds:.1f}s): "
        + ", ".join(f"{u}:{v:.4g}" for u, v in zip(scores.units, scores.importance))
    )

    depth_plan = plan(lm, scores, remove=remove)
    depth_plan.save(out / "plan.json")
    importance_chart(scores, out / "plan.png", removed=depth_plan.remove)
    counts = apply(lm, depth_plan)
    pruned = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=progress)
    pruned_text = _generate(lm, PROMPT)
    export(
        lm, out / "model", depth_plan, {"pruning": counts, "evaluation": [pruned.to_dict()]}, overwrite=True
    )
    print(
        f"[3/7] depth plan: removed blocks {', '.join(depth_plan.remove)} -> {out}/model "
        f"({counts['parameters_after']:,} parameters)"
    )

    lm = load("fixture", device="cpu", quiet=True)
    sparse_name = f"wanda{round(sparsity * 100)}"
    calib = calibration(lm, samples=sparsity_samples, kind="sparsity")
    sparse_plan = plan(lm, sparsity=sparsity, pruner="wanda", calib=calib, progress=progress)
    sparse_counts = apply(lm, sparse_plan, calib, progress=progress)
    export(lm, out / sparse_name, sparse_plan, {"pruning": sparse_counts}, overwrite=True)
    print(
        f"[4/7] Wanda at {sparsity:.0%} sparsity (uniform, {sparsity_samples} calibration samples) -> "
        f"{out}/{sparse_name} (zeros stored densely: same size and speed without sparse kernels)"
    )

    lm = load(str(out / "model"), device="cpu", quiet=True)
    before = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=False)
    record = recover(lm, "fixture:train", seqlen=128, steps=recover_steps, progress=progress)
    after = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=False)
    history = record.pop("history")
    record.update(perplexity_before=[before.to_dict()], perplexity_after=[after.to_dict()])
    export(
        lm,
        out / "model+lora",
        depth_plan,
        {"pruning": counts, "evaluation": [after.to_dict()], "recovery": record},
        overwrite=True,
        extras=lambda folder: (
            atomic_write_json(folder / "loss.json", history),
            loss_chart(
                history, folder / "loss.png", title="fixture, 3 blocks removed: LoRA on fixture:train"
            ),
        ),
    )
    print(
        f"[5/7] LoRA on fixture:train, {record['steps']} steps, {record['tokens']:,} tokens "
        f"({record['seconds']:.0f}s): perplexity {before.ppl:.3f} -> {after.ppl:.3f} -> {out}/model+lora"
    )

    print("[6/7] held-out perplexity (fixture:test) and zero-shot accuracy (bundled lm-eval tasks):")
    for label in ("model", sparse_name, "model+lora"):
        lm = load(str(out / label), device="cpu", quiet=True)
        measured[label] = _evaluate(lm, label, evals, progress=progress, **measure)

    from .reports.compare import report

    page = report(
        [out / "model", out / sparse_name, out / "model+lora", evals], out / "report", overwrite=True
    )
    results = {
        "dense": measured["dense"],
        "pruned": {**pruned.to_dict(), **measured["model"]},
        sparse_name: measured[sparse_name],
        "recovered": {**measured["model+lora"], "steps": record["steps"], "tokens": record["tokens"]},
        "plan": depth_plan.remove,
        "pruning": counts,
        "scores_seconds": scores.seconds,
        "generation": {"prompt": PROMPT, "dense": dense_text, "pruned": pruned_text},
        "seconds": time.perf_counter() - t0,
        **stamp(),
    }
    atomic_write_json(out / "results.json", results)
    print(f"[7/7] wrote {page}/report.md and report.html: the models side by side; results.json")
    print(f"      '{PROMPT}' dense : {dense_text!r}")
    print(f"      '{PROMPT}' pruned: {pruned_text!r}")
    return results
