"""Evaluating 12 single-block masks: skip(mask) and the trie engine vs a copied smaller model per mask.

    python bench/engine.py [--model fixture] [--samples 10] [--seqlen 128] [--repeats 3] [-o bench/results/engine.json]

The baseline is the reference code's approach (Shortened LLaMA's PPL criterion): deep-copy the model,
delete block i, run the calibration windows. `skip` swaps block i for an identity without copying;
`trie` (MaskEvaluator) also reuses the hidden states entering block i. All three must give the
same NLL; the script checks it and prints JSON with the wall-time ratios against the baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from layerprune.data import calibration_windows, default_bos, load_text
from layerprune.engine.masked import MaskEvaluator
from layerprune.engine.vocab import token_nll
from layerprune.io import atomic_write_json
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import load
from layerprune.provenance import stamp


@torch.no_grad()
def nll_of(model, ids: torch.Tensor, batch_size: int) -> float:
    return sum(
        float(token_nll(model(input_ids=b, use_cache=False).logits, b).double().sum())
        for b in ids.split(batch_size)
    )


def copied_model(model, ids, masks, batch_size):
    out = []
    for m in masks:
        pruned = copy.deepcopy(model)
        ModelAdapter(pruned).remove_blocks([i for i, k in enumerate(m) if not k])
        out.append(nll_of(pruned, ids, batch_size))
        del pruned
    return out


def skipped(model, adapter, ids, masks, batch_size):
    out = []
    for m in masks:
        with adapter.skip(m):
            out.append(nll_of(model, ids, batch_size))
    return out


def trie(model, adapter, ids, masks, batch_size):
    return MaskEvaluator(model, adapter, ids, batch_size=batch_size, progress=False).nll(masks)


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fixture")
    ap.add_argument("--calib", default="fixture:val")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=Path("bench/results/engine.json"))
    args = ap.parse_args(argv)

    lm = load(args.model, device="cpu", quiet=True)
    windows = calibration_windows(
        lm.tokenizer,
        load_text(args.calib, "val"),
        args.samples,
        args.seqlen,
        0,
        default_bos(lm.tokenizer, lm.adapter),
    )
    ids, L = windows.input_ids, lm.adapter.num_blocks
    masks = [[0 if j == i else 1 for j in range(L)] for i in range(L)]
    bs = args.batch_size
    variants = {
        "copied_model": lambda: copied_model(lm.model, ids, masks, bs),
        "skip": lambda: skipped(lm.model, lm.adapter, ids, masks, bs),
        "trie": lambda: trie(lm.model, lm.adapter, ids, masks, bs),
    }
    timed(variants["skip"], 1)  # warm-up: allocator, kernels
    results = {}
    for name, fn in variants.items():
        median, times, values = timed(fn, args.repeats)
        results[name] = {"seconds_median": median, "seconds": times, "nll": values}
    base = results["copied_model"]["nll"]
    max_rel = {k: max(abs(a - b) / abs(b) for a, b in zip(results[k]["nll"], base)) for k in ("skip", "trie")}
    doc = {
        "benchmark": "engine: 12 single-block masks",
        "model": args.model,
        "model_fingerprint": lm.fingerprint,
        "blocks": L,
        "calibration": windows.protocol,
        "threads": torch.get_num_threads(),
        "seconds_median": {k: v["seconds_median"] for k, v in results.items()},
        "ratio_vs_copied_model": {
            k: results[k]["seconds_median"] / results["copied_model"]["seconds_median"]
            for k in ("skip", "trie")
        },
        "max_relative_nll_difference_vs_copied_model": max_rel,
        "details": results,
        **stamp(),
    }
    assert max(max_rel.values()) < 1e-4, f"engines disagree: {max_rel}"
    atomic_write_json(args.output, doc)
    json.dump({k: v for k, v in doc.items() if k != "details"}, sys.stdout, indent=2)
    print()
    return doc


if __name__ == "__main__":
    main()
