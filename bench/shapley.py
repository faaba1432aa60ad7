"""Shapley layer contributions on the bundled model (12 blocks): fidelity, removal quality, trie speed.

    python bench/shapley.py [-o bench/results/shapley.json] [--store bench/results/shapley.sqlite]

- P2: exact Shapley values of the real utility PPL(dense)/PPL(mask) from all 4,096 masks (the
  ground truth), then every estimator at budgets 64 / 128 / 256 real evaluations, with the default
  strata (around 25% removal) and with wide strata (1..11 kept): Spearman rho against the truth.
  All real evaluations go through one store: the exact run pays for every mask once.
- Removal quality: remove 3..6 of 12 blocks by the paper's estimator and by the depth issue's `ppl`
  criterion (and by exact Shapley); held-out perplexity of each (fixture:test, seqlen 128).
- Trie: 256 stratified masks evaluated by the trie engine vs one skip-forward per mask, same utilities.
Calibration: 10 x 128 tokens of fixture:val, seed 0 (the paper's setting).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from _results import write

from layerprune.data import calibration
from layerprune.engine.masked import MaskEvaluator
from layerprune.engine.store import EvalStore
from layerprune.engine.vocab import token_nll
from layerprune.evaluation.perplexity import perplexity
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import LoadedModel, load
from layerprune.planners.depth import make_plan
from layerprune.pruners.depth import apply
from layerprune.scorers.run import run
from layerprune.scorers.shapley.masks import default_strata, stratified_masks
from layerprune.scorers.shapley.surrogate import spearman

HERE = Path(__file__).resolve().parent


def heldout_after(lm, plan) -> float:
    model = copy.deepcopy(lm.model)
    twin = LoadedModel(lm.name, model, lm.tokenizer, ModelAdapter(model), lm.path)
    twin._fingerprint = lm.fingerprint
    apply(twin, plan)
    return perplexity(twin, "fixture:test", seqlen=128, progress=False).ppl


def trie_timing(lm, windows, L) -> dict:
    """256 stratified masks: the trie engine vs one skip-forward per mask, same utilities."""
    masks = stratified_masks(L, default_strata(L, 0.25), 256, seed=7)
    t0 = time.perf_counter()
    trie_values = MaskEvaluator(lm.model, lm.adapter, windows.input_ids, progress=False).nll(masks)
    t_trie = time.perf_counter() - t0
    ids = windows.input_ids
    t0 = time.perf_counter()
    single = []
    with torch.no_grad():
        for m in masks:
            with lm.adapter.skip(m):
                single.append(
                    float(token_nll(lm.model(input_ids=ids, use_cache=False).logits, ids).double().sum())
                )
    t_single = time.perf_counter() - t0
    rel = max(abs(a - b) / b for a, b in zip(trie_values, single))
    result = {
        "masks": 256,
        "trie_seconds": t_trie,
        "per_mask_seconds": t_single,
        "ratio": t_trie / t_single,
        "max_relative_difference": rel,
    }
    print(
        f"trie over 256 masks {t_trie:.1f}s vs per mask {t_single:.1f}s -> ratio {t_trie / t_single:.3f} "
        f"(max rel diff {rel:.1e})",
        flush=True,
    )
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "shapley.json")
    ap.add_argument("--store", type=Path, default=HERE / "results" / "shapley.sqlite")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument(
        "--only-trie",
        action="store_true",
        help="only the trie timing (e.g. -o bench/results/shapley_trie.json)",
    )
    args = ap.parse_args(argv)

    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm)
    L = lm.adapter.num_blocks
    store = EvalStore(args.store, lm.fingerprint, windows.fingerprint, windows.protocol)
    doc: dict = {"benchmark": "shapley on fixture", "calibration": windows.protocol}

    if args.only_trie:
        doc["trie"] = trie_timing(lm, windows, L)
        return write(doc, args.output)

    t0 = time.perf_counter()
    exact = run(lm, "shapley", windows, estimator="exact", store=store, progress=False)
    doc["exact"] = {
        "values": exact.importance,
        "seconds": time.perf_counter() - t0,
        "masks": exact.extra["evaluations"],
    }
    truth = torch.tensor(exact.importance)
    print(
        f"exact Shapley from {exact.extra['evaluations']} masks ({doc['exact']['seconds']:.0f}s): "
        + " ".join(f"{v:.4f}" for v in exact.importance),
        flush=True,
    )

    rows = []
    strata_sets = {"default": default_strata(L, 0.25), "wide": list(range(L - 1, 0, -1))}
    for budget in args.budgets:
        for strata_name, strata in strata_sets.items():
            for estimator in ("stratified", "shapley", "kernel"):
                if estimator == "kernel" and strata_name == "wide":
                    continue  # kernel draws its own coalitions from the Shapley kernel
                r = run(
                    lm,
                    "shapley",
                    windows,
                    estimator=estimator,
                    budget=budget,
                    strata=strata,
                    store=store,
                    progress=False,
                )
                rho = spearman(torch.tensor(r.importance), truth)
                row = {
                    "estimator": estimator,
                    "budget": budget,
                    "strata": strata_name if estimator != "kernel" else None,
                    "spearman_vs_exact": rho,
                    "real_evaluations": r.extra["evaluations"],
                    "surrogate": r.extra.get("surrogate"),
                }
                rows.append(row)
                sur = r.extra.get("surrogate") or {}
                print(
                    f"budget {budget:3d} {estimator:10s} strata {row['strata'] or '-':7s} rho {rho:.3f}  "
                    f"(evaluations {r.extra['evaluations']}, surrogate R2 {sur.get('r2') or float('nan'):.3f})",
                    flush=True,
                )
    doc["P2"] = rows
    doc["P2_best"] = max(rows, key=lambda r: r["spearman_vs_exact"])

    quality = []
    cache: dict[tuple, float] = {}  # the same removal set is evaluated once
    ppl_scores = run(lm, "ppl", windows, progress=False)
    paper = run(lm, "shapley", windows, estimator="stratified", budget=256, store=store, progress=False)
    for n in (3, 4, 5, 6):
        row = {"removed_blocks": n}
        for name, s in (("ppl", ppl_scores), ("shapley_stratified", paper), ("shapley_exact", exact)):
            plan = make_plan(s, remove=n)
            key = tuple(sorted(plan.remove))
            if key not in cache:
                cache[key] = heldout_after(lm, plan)
            row[name] = {"removed": plan.remove, "heldout_ppl": cache[key]}
        quality.append(row)
        print(
            f"remove {n}: "
            + ", ".join(
                f"{k} {v['removed']} -> {v['heldout_ppl']:.2f}" for k, v in row.items() if isinstance(v, dict)
            ),
            flush=True,
        )
    doc["removal_quality"] = quality
    doc["dense_heldout_ppl"] = perplexity(lm, "fixture:test", seqlen=128, progress=False).ppl

    doc["trie"] = trie_timing(lm, windows, L)
    return write(doc, args.output)


if __name__ == "__main__":
    main()
