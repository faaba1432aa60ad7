"""The main job, top to bottom: the pipeline a user runs, as library calls.

    layerprune demo -o runs/demo                   # the real model, SmolLM2-135M (`smollm2`)
    layerprune demo --model fixture -o runs/demo   # the bundled 11.5M model: the quick path

Two pruned models and a recovered one, measured and compared:
score (leave-one-out perplexity) -> plan (remove 20% of the blocks; 3 of 12 on the fixture) ->
apply -> export `model/`; Wanda at 50% sparsity -> export `wanda50/`; LoRA on fixture:train for the
depth-pruned model -> `model+lora/`; held-out perplexity and zero-shot accuracy (the bundled lm-eval
tasks) of the dense and every pruned model -> `evals/`; one side-by-side report -> `report/`.
Calibration is fixture:val, training fixture:train and evaluation fixture:test: the bundled text's
documents go to one split each by a hash of their text, so nothing evaluated was seen before.
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
# Per model: sizes that keep the real model's demo within 10 minutes on 2 CPU cores.
SETTINGS = {
    "fixture": {"seqlen": 128, "eval_windows": None, "zeroshot_limit": None, "sparsity_samples": 128,
                "sparsity_seqlen": None, "recover_steps": 100, "recover_batch": 8},
    "real": {"seqlen": 512, "eval_windows": 8, "zeroshot_limit": 40, "sparsity_samples": 16,
             "sparsity_seqlen": 512, "recover_steps": 25, "recover_batch": 4},
}  # fmt: skip


def _check_output(out: Path, model: str, quiet: bool) -> None:
    """The demo writes several folders under `out` (replacing them): refused before any work when
    `out` is, lies inside or holds the input model's folder, or cannot be written."""
    from .io import check_destination, check_writable
    from .models.loading import resolve

    check_destination(out, {"model folder": resolve(model, quiet=quiet)[1]})
    check_writable(out / "results.json")


def _estimate(lm, s: dict) -> float:
    """Seconds the demo should take here, from one timed forward and each stage's forward count."""
    from .data import Windows
    from .evaluation.perplexity import perplexity_of_windows

    ids = calibration(lm, "fixture:val", samples=2, seqlen=min(128, s["seqlen"])).input_ids
    perplexity_of_windows(lm.model, lm.adapter, Windows(ids[:1, :8], {}), 8, progress=False)  # warm-up
    t0 = time.perf_counter()
    perplexity_of_windows(lm.model, lm.adapter, Windows(ids, {}), 8, progress=False)
    per_token = (time.perf_counter() - t0) / ids.numel()
    L = lm.adapter.num_blocks
    eval_tokens = (s["eval_windows"] or 64) * s["seqlen"]
    zs_tokens = 3 * (s["zeroshot_limit"] or 300) * 4 * 48  # 3 tasks, ~4 choices of ~48 tokens
    tokens = (  # tokens through a full forward, stage by stage
        4 * (eval_tokens + zs_tokens)  # dense, depth-pruned, sparse, recovered
        + (L / 2 + 1) * 10 * 128  # leave-one-out ppl with prefix reuse
        + 2.2 * s["sparsity_samples"] * (s["sparsity_seqlen"] or 256)  # sequential Wanda
        + 3 * s["recover_steps"] * s["recover_batch"] * 128  # forward + backward
    )
    return tokens * per_token


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
    name = str(lm.path) if label != "dense" else lm.name
    atomic_write_json(folder / f"{label}.json", results_document(lm, name, [ppl.to_dict()], zs))
    tasks = ", ".join(f"{t} {v[v['metric']]:.3f}" for t, v in zs["tasks"].items())
    print(f"      {label:<10} perplexity {ppl.ppl:8.3f}   zero-shot {tasks} (mean {zs['mean']:.3f})")
    return {"ppl": ppl.ppl, "zeroshot_mean": zs["mean"], "zeroshot": zs["tasks"]}


_UNSET = object()


def demo(
    out: str | Path,
    model: str = "smollm2",
    method: str = "ppl",
    remove: int | None = None,
    seqlen: int | None = None,
    eval_windows=_UNSET,
    zeroshot_limit=_UNSET,
    sparsity: float = 0.5,
    sparsity_samples: int | None = None,
    recover_steps: int | None = None,
    quiet: bool = False,
    device: str | None = None,
    dtype: str = "auto",
) -> dict:
    """`model`: smollm2 (the real model, default), fixture, or any model folder; unset sizes take
    SETTINGS ("fixture" for the fixture, "real" otherwise). `eval_windows`: evaluate on the first N
    windows of fixture:test only (None: all of it); `zeroshot_limit`: the first N examples of each
    zero-shot task (None: all); `remove`: blocks to remove (default 20% of them, 3 on the fixture)."""
    from .recovery import recover

    out = Path(out)
    _check_output(out, model, quiet)
    progress = not quiet
    t0 = time.perf_counter()
    evals = out / "evals"
    s = dict(SETTINGS["fixture" if model == "fixture" else "real"])
    given = {"seqlen": seqlen, "sparsity_samples": sparsity_samples, "recover_steps": recover_steps}
    s.update({k: v for k, v in given.items() if v is not None})
    s.update(
        {
            k: v
            for k, v in (("eval_windows", eval_windows), ("zeroshot_limit", zeroshot_limit))
            if v is not _UNSET
        }
    )
    lm = load(model, device=device, dtype=dtype, quiet=quiet)
    context = lm.adapter.context_length
    if context:  # the demo's own sizes fit the model's context (one it was given is checked as given)
        for key in ("seqlen", "sparsity_seqlen"):
            if given.get(key) is None and s[key] is not None:
                s[key] = min(s[key], context)
    short = min(128, s["seqlen"])  # the depth papers' 128-token calibration, and LoRA's windows
    seqlen, eval_windows, zeroshot_limit = s["seqlen"], s["eval_windows"], s["zeroshot_limit"]
    measure = {"seqlen": seqlen, "eval_windows": eval_windows, "zeroshot_limit": zeroshot_limit}
    L = lm.adapter.num_blocks
    if remove is None:
        remove = 3 if model == "fixture" else max(1, round(0.2 * L))
    estimate = _estimate(lm, s)
    print(
        f"[1/7] loaded {model}: {lm.adapter.spec.name}, {L} blocks, "
        f"{sum(p.numel() for p in lm.model.parameters()):,} parameters; estimated {estimate / 60:.1f} min "
        "on this machine; dense model:",
        flush=True,
    )
    measured = {"dense": _evaluate(lm, "dense", evals, progress=progress, **measure)}
    dense_text = _generate(lm, PROMPT)

    windows = calibration(lm, "fixture:val", samples=10, seqlen=short)  # the depth papers' size, seed 0
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
        f"({counts['parameters_after']:,} parameters)",
        flush=True,
    )

    lm = load(model, device=device, dtype=dtype, quiet=True)
    sparse_name = f"wanda{round(sparsity * 100)}"
    calib = calibration(
        lm, "fixture:val", samples=s["sparsity_samples"], seqlen=s["sparsity_seqlen"], kind="sparsity"
    )
    sparse_plan = plan(lm, sparsity=sparsity, pruner="wanda", calib=calib, progress=progress)
    sparse_counts = apply(lm, sparse_plan, calib, progress=progress)
    export(lm, out / sparse_name, sparse_plan, {"pruning": sparse_counts}, overwrite=True)
    print(
        f"[4/7] Wanda at {sparsity:.0%} sparsity (uniform, {s['sparsity_samples']} x {calib.input_ids.shape[1]} "
        "calibration tokens of fixture:val) -> "
        f"{out}/{sparse_name} (zeros stored densely: same size and speed without sparse kernels)"
    )

    lm = load(str(out / "model"), device=device, dtype=dtype, quiet=True)
    before = perplexity(lm, "fixture:test", seqlen=seqlen, max_windows=eval_windows, progress=False)
    record = recover(
        lm,
        "fixture:train",
        seqlen=short,
        steps=s["recover_steps"],
        batch_size=s["recover_batch"],
        progress=progress,
    )
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
                history, folder / "loss.png", title=f"{model}, {remove} blocks removed: LoRA on fixture:train"
            ),
        ),
    )
    print(
        f"[5/7] LoRA on fixture:train, {record['steps']} steps, {record['tokens']:,} tokens "
        f"({record['seconds']:.0f}s): perplexity {before.ppl:.3f} -> {after.ppl:.3f} -> {out}/model+lora"
    )

    print("[6/7] held-out perplexity (fixture:test) and zero-shot accuracy (bundled lm-eval tasks):")
    for label in ("model", sparse_name, "model+lora"):
        lm = load(str(out / label), device=device, dtype=dtype, quiet=True)
        measured[label] = _evaluate(lm, label, evals, progress=progress, **measure)

    from .reports.compare import report

    page = report(
        [out / "model", out / sparse_name, out / "model+lora", evals],
        out / "report",
        overwrite=True,
        title=f"layerprune demo on {model}: calibration fixture:val, LoRA on fixture:train, "
        "held-out fixture:test (disjoint documents)",
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
        "estimated_seconds": estimate,
        "model": model,
        "texts": {"calibration": "fixture:val", "training": "fixture:train", "heldout": "fixture:test"},
        **stamp(),
    }
    atomic_write_json(out / "results.json", results)
    print(
        f"[7/7] wrote {page}/report.md and report.html: the models side by side; results.json "
        f"({results['seconds'] / 60:.1f} min, estimated {estimate / 60:.1f})"
    )
    print(f"      '{PROMPT}' dense : {dense_text!r}")
    print(f"      '{PROMPT}' pruned: {pruned_text!r}")
    return results
