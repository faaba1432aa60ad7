"""Depth pruning on the bundled model: every scorer, 3 of 12 blocks removed, and the issue's figures.

    python bench/depth.py [-o bench/results/depth.json] [--repeats 3]

Writes JSON with, per method: scoring wall time, removed blocks, calibration and held-out perplexity
of the pruned model; the dense figures; and
- P1: `ppl` scoring vs the reference approach (a deep-copied smaller model per block), same run,
  same batches: wall-time ratio and the largest relative difference of the scores;
- decode latency: greedy generation (HF generate, KV cache) of 128 tokens, batch 1, dense vs 3 blocks
  removed, same run, interleaved rounds (at least 7), medians;
- Taylor peak memory (RSS, fresh processes, median of 3): ours, the reference's keep-every-gradient
  way, and the same forward/backward computing no weight gradient (activations), against
  model + 2 x largest block + activations; on the fixture and on a wide random model (bench/_rss.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _results import write

from layerprune.data import calibration
from layerprune.engine.vocab import token_nll
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import LoadedModel, load
from layerprune.planners.depth import make_plan
from layerprune.pruners.depth import apply
from layerprune.scorers.run import run

METHODS = ("ppl", "taylor", "bi", "angular", "sleb")
HERE = Path(__file__).resolve().parent


def interleaved_medians(fns, repeats):
    """Run the functions in turn, `repeats` rounds (so that a slow spell of a shared machine hits
    all of them alike); the median time and the last result of each."""
    times = [[] for _ in fns]
    outs = [None] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], outs, times


def _ppl_of_model(model, ids) -> float:
    nll = float(token_nll(model(input_ids=ids, use_cache=False).logits, ids).double().sum())
    return math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1)))


@torch.no_grad()
def reference_ppl_scores(model, ids, dense: bool = False):
    """The reference's PPL criterion: for each block, a deep copy without it, then the windows.
    With `dense`, also the dense model's calibration perplexity (our scorer reports it too)."""
    out = []
    for i in range(ModelAdapter(model).num_blocks):
        pruned = copy.deepcopy(model)
        ModelAdapter(pruned).remove_blocks([i])
        out.append(_ppl_of_model(pruned, ids))
        del pruned
    if dense:
        out.append(_ppl_of_model(model, ids))
    return out


def pruned_copy(lm, plan):
    model = copy.deepcopy(lm.model)
    twin = LoadedModel(lm.name, model, lm.tokenizer, ModelAdapter(model), lm.path, lm.source_dtype)
    twin._fingerprint = lm.fingerprint  # same weights as lm until apply() changes them
    apply(twin, plan)
    return twin


@torch.no_grad()
def greedy(model, prompt_ids, new_tokens):
    out = model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == prompt_ids.shape[1] + new_tokens
    return out


def decode_latency(lm, plan, repeats) -> dict:
    """Dense vs the plan's pruned model, greedy 128 tokens, batch 1, interleaved rounds."""
    pruned = pruned_copy(lm, plan)
    prompt = lm.tokenizer("And it came to pass, when the", return_tensors="pt").input_ids
    for m in (lm.model, pruned.model):
        greedy(m, prompt, 8)  # warm-up
    (t_dense, t_pruned), _, rounds = interleaved_medians(
        [lambda: greedy(lm.model, prompt, 128), lambda: greedy(pruned.model, prompt, 128)],
        max(repeats, 7),
    )
    print(
        f"decode 128 tokens: dense {t_dense:.3f}s, pruned {t_pruned:.3f}s -> ratio {t_pruned / t_dense:.3f}",
        flush=True,
    )
    return {
        "new_tokens": 128,
        "batch": 1,
        "dense_seconds": t_dense,
        "pruned_seconds": t_pruned,
        "ratio": t_pruned / t_dense,
        "target_ratio": 0.8,
        "rounds": rounds,
        "pruned_blocks": plan.remove,
    }


def taylor_memory(repeats: int = 3) -> dict:
    """Median peak-RSS growth over the loaded model, fresh processes, for the fixture and for a
    wide random model in which weight gradients are large against the allocator's noise (~25 MB)."""
    out = {}
    for which in ("fixture", "wide"):
        growth: dict[str, list[int]] = {}
        sizes = {}
        for _ in range(repeats):
            for mode in ("activations", "ours", "reference"):
                r = subprocess.run(
                    [sys.executable, str(HERE / "_rss.py"), mode, which],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                m = json.loads(r.stdout.strip().splitlines()[-1])
                growth.setdefault(mode, []).append(m["peak"] - m["rss_after_load"])
                sizes = {k: m[k] for k in ("model_bytes", "largest_block_bytes")}
        med = {mode: statistics.median(v) for mode, v in growth.items()}
        block = sizes["largest_block_bytes"]
        # RSS after loading already holds the model: the bound's "model size" is that baseline, so
        # the bound on the growth is activations + 2 x the largest block.
        bound = med["activations"] + 2 * block
        out[which] = {
            **sizes,
            "peak_growth_median": med,
            "peak_growth_runs": growth,
            "bound_growth": bound,
            "ours_within_bound": med["ours"] <= bound,
            "ours_extra_over_activations_in_blocks": (med["ours"] - med["activations"]) / block,
            "reference_extra_over_activations_in_blocks": (med["reference"] - med["activations"]) / block,
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "depth.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--remove", type=int, default=3)
    ap.add_argument("--heldout-seqlen", type=int, default=128)
    ap.add_argument(
        "--only-decode",
        action="store_true",
        help="only the decode latency (e.g. -o bench/results/depth_decode.json)",
    )
    args = ap.parse_args(argv)

    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm)  # 10 x 128 tokens of fixture:val, seed 0: the papers' default
    ids = windows.input_ids
    doc: dict = {
        "benchmark": "depth pruning on fixture",
        "calibration": windows.protocol,
        "threads": torch.get_num_threads(),
    }

    def ppl_of(model_lm):
        calib_nll = float(
            token_nll(model_lm.model(input_ids=ids, use_cache=False).logits, ids).double().sum()
        )
        held = perplexity(model_lm, "fixture:test", seqlen=args.heldout_seqlen, progress=False)
        return math.exp(calib_nll / (ids.shape[0] * (ids.shape[1] - 1))), held

    if args.only_decode:
        plan = make_plan(run(lm, "ppl", windows, progress=False), remove=args.remove)
        doc["decode_latency"] = decode_latency(lm, plan, args.repeats)
        return write(doc, args.output)

    with torch.no_grad():
        dense_calib, dense_held = ppl_of(lm)
    doc["dense"] = {
        "calibration_ppl": dense_calib,
        "heldout_ppl": dense_held.ppl,
        "heldout_protocol": dense_held.protocol,
    }
    print(f"dense: calibration ppl {dense_calib:.3f}, held-out ppl {dense_held.ppl:.3f}", flush=True)

    # P1: ppl scoring, ours vs the reference approach, same run, interleaved rounds. Our scorer
    # also returns the dense calibration perplexity: the like-for-like reference computes it too.
    run(lm, "ppl", windows, progress=False)  # warm-up
    (t_ours, t_ref, t_ref_loo), (ours, ref, _), raw = interleaved_medians(
        [
            lambda: run(lm, "ppl", windows, progress=False),
            lambda: reference_ppl_scores(lm.model, ids, dense=True),
            lambda: reference_ppl_scores(lm.model, ids),
        ],
        args.repeats,
    )
    rel = max(abs(a - b) / b for a, b in zip(ours.importance + [ours.extra["calibration_ppl"]], ref))
    doc["P1_ppl_scoring"] = {
        "ours_seconds": t_ours,
        "reference_seconds": t_ref,
        "ratio": t_ours / t_ref,
        "target_ratio": 0.6,
        "reference_without_dense_seconds": t_ref_loo,
        "ratio_against_reference_without_dense": t_ours / t_ref_loo,
        "rounds": raw,
        "max_relative_score_difference": rel,
        "block_calls_ours": ours.extra["block_calls"],
        "block_calls_reference": lm.adapter.num_blocks * (lm.adapter.num_blocks - 1),
    }
    print(
        f"P1: ppl scoring {t_ours:.2f}s vs reference {t_ref:.2f}s -> ratio {t_ours / t_ref:.3f} "
        f"({t_ours / t_ref_loo:.3f} against the reference without the dense evaluation), max rel diff {rel:.1e}",
        flush=True,
    )

    methods = {}
    plans = {}
    for method in METHODS:
        scores = run(lm, method, windows, progress=False)
        plan = make_plan(scores, remove=args.remove)
        pruned = pruned_copy(lm, plan)
        with torch.no_grad():
            calib_ppl, held = ppl_of(pruned)
        methods[method] = {
            "scoring_seconds": scores.seconds,
            "importance": scores.importance,
            "removed": plan.remove,
            "protected": plan.params["protected"],
            "calibration_ppl": calib_ppl,
            "heldout_ppl": held.ppl,
        }
        plans[method] = plan
        print(
            f"{method:8s} removed {plan.remove} (protected {plan.params['protected']}): calibration {calib_ppl:.3f}, "
            f"held-out {held.ppl:.3f}, scoring {scores.seconds:.2f}s",
            flush=True,
        )
        del pruned
    doc["methods"] = methods

    doc["decode_latency"] = decode_latency(lm, plans["ppl"], args.repeats)

    doc["taylor_memory"] = taylor_memory()
    for which, m in doc["taylor_memory"].items():
        g = m["peak_growth_median"]
        print(
            f"taylor peak RSS growth on {which}: ours {g['ours'] / 2**20:.1f} MiB (bound {m['bound_growth'] / 2**20:.1f}:"
            f" activations {g['activations'] / 2**20:.1f} + 2 blocks), reference {g['reference'] / 2**20:.1f} MiB",
            flush=True,
        )
    return write(doc, args.output)


if __name__ == "__main__":
    main()
