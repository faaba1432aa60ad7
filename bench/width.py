"""Width pruning on the bundled model (Self-Pruner): search cost, quality against hand-made
allocations, and the speed of the physically smaller models.

    python bench/width.py [-o bench/results/width.json] [--seeds 0 1 2] [--widths 0.2 0.3]

- P5 search cost: one full default search (population 30, 10 crossovers + 10 mutations, 20
  iterations; fitness = calibration perplexity on 10 x 128 tokens) on the fixture, wall time against
  (number of evaluations x the median time of one masked calibration forward, timed inside the same
  search, so that a slow spell of a shared machine hits both alike; also timed again afterwards on
  random decisions): the machinery's overhead is the ratio - 1.
- Quality: held-out perplexity (first N windows of fixture:test at seqlen 128) at each width for
  uniform, OWL-rate, alpha-rate and searched rates (Wanda-sp groups and channels for all), the search
  from several seeds.
- Speed: the searched plans applied physically; prefill (1 x 256 tokens) and decode (128 new tokens,
  greedy, KV cache) latency against dense, interleaved rounds, medians; parameter counts of the
  exported checkpoints (which reload with layerprune.load, and with plain transformers when uniform).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import write

import layerprune as lp
from layerprune.evaluation.perplexity import perplexity_of_windows
from layerprune.models.width import masked
from layerprune.models.width_decisions import budgets, counts, decision_of, masks_for
from layerprune.planners.width_search import Fitness

HERE = Path(__file__).resolve().parent


def masked_forward_seconds(lm, table, windows, samples: int = 12) -> list[float]:
    """Time of one masked calibration forward (what a fitness evaluation costs without machinery)."""
    blocks = budgets(lm.adapter)
    rng = random.Random(0)
    times = []
    for _ in range(samples):
        rates = [rng.uniform(0.05, 0.4) for _ in blocks]
        masks = masks_for(counts(rates, blocks), table)
        t0 = time.perf_counter()
        with masked(lm.adapter, masks):
            perplexity_of_windows(lm.model, lm.adapter, windows, 16, progress=False)
        times.append(time.perf_counter() - t0)
    return times


def heldout(lm_like, windows) -> float:
    return perplexity_of_windows(lm_like.model, lm_like.adapter, windows, 32, progress=False).ppl


def latency(models: dict, rounds: int, new_tokens: int = 128) -> dict:
    prompt = torch.randint(3, 8000, (1, 256), generator=torch.Generator().manual_seed(0))
    times = {name: {"prefill": [], "decode": []} for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=prompt, use_cache=False)
                times[name]["prefill"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model.generate(
                    prompt[:, :8], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                )
                times[name]["decode"].append(time.perf_counter() - t0)
    out = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    for name in models:
        out[name]["prefill_ratio"] = out[name]["prefill"] / out["dense"]["prefill"]
        out[name]["decode_ratio"] = out[name]["decode"] / out["dense"]["decode"]
    return {"rounds": rounds, "new_tokens": new_tokens, "prompt_tokens": 256, "medians_seconds": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "width.json")
    ap.add_argument("--widths", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--heldout-windows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    lm = lp.load("fixture", device="cpu", quiet=True)
    calib = lp.calibration(lm, kind="width")  # 128 x 256 of fixture:val: the Wanda-sp statistics
    fitness_windows = lp.calibration(lm)  # 10 x 128: the search's fitness
    test = lp.eval_windows(lm.tokenizer, lp.load_text("fixture:test"), 128, "first", args.heldout_windows)
    t0 = time.perf_counter()
    scores = lp.score(lm, "wanda-sp", calib, progress=False)
    table = scores.extra  # groups and channels per block
    doc: dict = {
        "benchmark": "width pruning on fixture",
        "scores_seconds": time.perf_counter() - t0,
        "structured_calibration": calib.protocol,
        "fitness_calibration": fitness_windows.protocol,
        "heldout_protocol": test.protocol,
        "dense_heldout_ppl": heldout(lm, test),
    }
    print(f"dense held-out ppl {doc['dense_heldout_ppl']:.3f}", flush=True)

    quality, plans = [], {}
    for width in args.widths:
        for allocation in ("uniform", "owl", "alpha"):
            plan = lp.plan(lm, scores, width=width, allocation=allocation, calib=calib, progress=False)
            fit = Fitness(lm, table, fitness_windows).one(plan.params["rates"])
            with masked(
                lm.adapter,
                masks_for(decision_of(plan, budgets(lm.adapter)), table),
            ):
                ppl = heldout(lm, test)
            quality.append({"width": width, "allocation": allocation, "seed": None, "calibration_ppl": fit,
                            "heldout_ppl": ppl, "achieved": plan.params["achieved"], "rates": plan.params["achieved_rates"]})  # fmt: skip
            print(f"{width} {allocation:8s} calib {fit:8.3f} held-out {ppl:8.3f}", flush=True)
        for seed in args.seeds:
            plan = lp.plan(lm, scores, width=width, allocation="search", calib=calib, seed=seed,
                           iterations=args.iterations, progress=False)  # fmt: skip
            seconds = plan.extra["search_seconds"]  # the search alone: seeding with OWL/alpha rates excluded
            decision = decision_of(plan, budgets(lm.adapter))
            with masked(lm.adapter, masks_for(decision, table)):
                ppl = heldout(lm, test)
            evals = plan.extra["evaluations_this_run"]
            row = {"width": width, "allocation": "search", "seed": seed, "calibration_ppl": plan.extra["best_fitness"],
                   "heldout_ppl": ppl, "achieved": plan.params["achieved"], "rates": plan.params["achieved_rates"],
                   "search_seconds": seconds, "evaluations": evals}  # fmt: skip
            quality.append(row)
            plans.setdefault(width, []).append((ppl, plan))
            print(f"{width} search s{seed} calib {row['calibration_ppl']:8.3f} held-out {ppl:8.3f} "
                  f"({evals} evaluations, {seconds:.1f}s)", flush=True)  # fmt: skip
            if width == args.widths[0] and seed == args.seeds[0]:
                per_eval = masked_forward_seconds(lm, table, fitness_windows)
                during = plan.extra["forward_seconds_median"]
                doc["P5"] = {
                    "search_seconds": seconds,
                    "evaluations": evals,
                    "masked_forward_seconds_median_during_search": during,
                    "forward_seconds_total_during_search": plan.extra["forward_seconds_total"],
                    "masked_forward_seconds_median_after": statistics.median(per_eval),
                    "masked_forward_seconds_after": per_eval,
                    "ratio": seconds / (evals * during),
                    "ratio_to_forwards_as_run": seconds / plan.extra["forward_seconds_total"],
                    "target": 1.3,
                }
                print(f"P5: {seconds:.1f}s / ({evals} x {during:.4f}s) = {doc['P5']['ratio']:.3f} "
                      f"(to the forwards as run: {doc['P5']['ratio_to_forwards_as_run']:.3f})", flush=True)  # fmt: skip
    doc["quality"] = quality

    models, exported = {"dense": lm.model}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for width, candidates in plans.items():
            _, best = min(candidates, key=lambda c: c[0])
            pruned = lp.LoadedModel(
                lm.name, copy.deepcopy(lm.model), lm.tokenizer, None, lm.path, lm.source_dtype
            )
            pruned.adapter = lp.ModelAdapter(pruned.model)
            counts_ = lp.apply(pruned, best, calib, progress=False)
            out = lp.export(pruned, Path(tmp) / f"w{width}", best, {"pruning": counts_})
            reloaded = lp.load(str(out), device="cpu", quiet=True)
            exported[str(width)] = {
                "parameters": sum(p.numel() for p in reloaded.model.parameters()),
                "standard_config": counts_["standard_config"],
                "seed": best.seed,
                "heldout_ppl_reloaded": heldout(reloaded, test),
            }
            models[f"width {width}"] = reloaded.model
    exported["dense"] = {"parameters": sum(p.numel() for p in lm.model.parameters())}
    doc["exported"] = exported
    doc["speed"] = latency(models, args.rounds)
    for name, m in doc["speed"]["medians_seconds"].items():
        print(f"{name}: prefill {m['prefill_ratio']:.3f}, decode {m['decode_ratio']:.3f} of dense")
    return write(doc, args.output)


if __name__ == "__main__":
    main()
