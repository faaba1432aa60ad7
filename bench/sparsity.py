"""Layer-wise sparsity on the bundled model: the AlphaPruning table (P3) and pruning memory (P4).

    python bench/sparsity.py [-o bench/results/sparsity.json] [--targets 0.5 0.6 0.7 0.8]

P3: held-out perplexity (the first 128 windows of fixture:test, seqlen = the context, 256; --heldout-windows 0
for all of it) at each target for
{uniform, owl, alpha} x {magnitude, wanda, sparsegpt}, and 2:4 for each pruner (uniform; alpha and
owl turn into per-layer N:4). Calibration: 128 samples x 256 tokens of fixture:val, seed 0.
Alpha uses the reference scripts' eps (0.3 magnitude, 0.2 Wanda/SparseGPT); where that eps would
give a layer a sparsity >= 1 the largest eps that fits is used and recorded.
P4: peak RSS of Wanda and SparseGPT pruning, fresh processes, divided by the parameter bytes, with
the calibration activations in memory and offloaded to disk.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import write

from layerprune.data import calibration
from layerprune.errors import LayerpruneError
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import LoadedModel, load
from layerprune.planners.sparsity import alpha, largest_epsilon, owl, uniform
from layerprune.pruners.unstructured import PRUNERS, prune
from layerprune.scorers.run import run

HERE = Path(__file__).resolve().parent


def heldout(lm, model, max_windows) -> float:
    twin = LoadedModel(lm.name, model, lm.tokenizer, ModelAdapter(model), lm.path)
    return perplexity(twin, "fixture:test", max_windows=max_windows, progress=False).ppl


def memory() -> list[dict]:
    """P4: Wanda and SparseGPT, activations in memory and on disk, fresh processes, batch 1."""
    mem = []
    for pruner in ("wanda", "sparsegpt"):
        for offload in ("memory", "disk"):
            r = subprocess.run(
                [sys.executable, str(HERE / "_prune_rss.py"), pruner, offload, "1"],
                capture_output=True,
                text=True,
                check=True,
            )
            m = json.loads(r.stdout.strip().splitlines()[-1])
            mem.append(m)
            print(
                f"P4 {pruner:9s} activations in {offload:6s}: (model + pruning growth) / parameter bytes = "
                f"{m['ratio']:.3f}; from before loading {m['ratio_including_load']:.3f} ({m['seconds']:.1f}s)",
                flush=True,
            )
    return mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "sparsity.json")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--only-memory", action="store_true", help="only P4 (e.g. -o bench/results/sparsity_memory.json)"
    )
    ap.add_argument(
        "--heldout-windows",
        type=int,
        default=128,
        help="the first N windows of fixture:test (128 x 256 = 32,768 tokens; 0 = all)",
    )
    args = ap.parse_args(argv)

    if args.only_memory:
        return write({"benchmark": "sparsity pruning memory on fixture", "P4": memory()}, args.output)

    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm, samples=128, kind="sparsity")
    names = lm.adapter.layer_names()
    numel = [lm.adapter.layer(n).weight.numel() for n in names]
    max_windows = args.heldout_windows or None
    dense = perplexity(lm, "fixture:test", max_windows=max_windows, progress=False)
    doc: dict = {
        "benchmark": "sparsity on fixture",
        "calibration": windows.protocol,
        "heldout_protocol": dense.protocol,
        "dense_heldout_ppl": dense.ppl,
    }
    print(f"dense held-out ppl {dense.ppl:.3f}", flush=True)

    alpha_scores = run(lm, "alpha", None, progress=False)
    owl_scores = run(lm, "owl", windows, progress=False, batch_size=8)
    doc["alpha_block_values"] = alpha_scores.extra["block_values"]
    doc["owl_outlier_ratio_percent"] = owl_scores.importance

    def allocation(kind, target, pruner):
        if kind == "uniform":
            return uniform(names, target), {}
        if kind == "owl":
            return owl(names, owl_scores.importance, target, 0.08), {"lambda": 0.08, "M": 5}
        eps = 0.3 if pruner == "magnitude" else 0.2
        try:
            return alpha(names, numel, alpha_scores.extra["metric_values"], target, eps), {"epsilon": eps}
        except LayerpruneError:
            eps = largest_epsilon(names, numel, alpha_scores.extra["metric_values"], target, True)
            return alpha(names, numel, alpha_scores.extra["metric_values"], target, eps), {
                "epsilon": eps,
                "reduced": True,
            }

    rows = []
    configs = [(t, k, p, None) for t in args.targets for k in ("uniform", "owl", "alpha") for p in PRUNERS]
    configs += [(0.5, k, p, (2, 4)) for k in ("uniform", "owl", "alpha") for p in PRUNERS]
    for target, kind, pruner, nm in configs:
        targets, extra = allocation(kind, target, pruner)
        model = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        achieved = prune(
            model, ModelAdapter(model), windows.input_ids, targets, pruner, nm, batch_size=32, progress=False
        )
        seconds = time.perf_counter() - t0
        ppl = heldout(lm, model, max_windows)
        mean = sum(achieved[n] * p for n, p in zip(names, numel)) / sum(numel)
        row = {
            "target": target,
            "allocation": kind,
            "pruner": pruner,
            "nm": list(nm) if nm else None,
            "heldout_ppl": ppl,
            "achieved_sparsity": mean,
            "prune_seconds": seconds,
            **extra,
        }
        rows.append(row)
        print(
            f"{target:.1f} {kind:8s} {pruner:9s} {'2:4' if nm else '   '} ppl {ppl:10.3f}  sparsity {mean:.4f}  {seconds:5.1f}s",
            flush=True,
        )
        del model
    doc["P3"] = rows

    def ppl_of(t, k, p, nm=None):
        return next(
            r["heldout_ppl"]
            for r in rows
            if (r["target"], r["allocation"], r["pruner"], r["nm"]) == (t, k, p, nm)
        )

    if 0.7 in args.targets:
        doc["P3_ratio_alpha_wanda_over_uniform_wanda_at_70"] = ppl_of(0.7, "alpha", "wanda") / ppl_of(
            0.7, "uniform", "wanda"
        )
        print(
            f"alpha+wanda / uniform+wanda at 70%: {doc['P3_ratio_alpha_wanda_over_uniform_wanda_at_70']:.3f}"
        )

    if not args.skip_memory:
        doc["P4"] = memory()
    return write(doc, args.output)


if __name__ == "__main__":
    main()
