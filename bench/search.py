"""EvoPress-style searches against the allocation heuristics, on the real model (SmolLM2-135M) and the
fixture: per-layer sparsity levels (Wanda, SparseGPT) and depth removal sets.

    python bench/search.py [--model smollm2|fixture] [--only wanda-0.7,depth-6,...] [--generations G]

Protocol as bench/real.py: calibration fixture:val (the level database and `apply` on 16 x 512 windows,
the search's fitness on its own 16 x 128 windows of the same text), held-out fixture:test (the first
8 windows of 512 tokens), disjoint by construction; the fitness never sees held-out text. The
baselines (uniform, OWL, AlphaPruning; ppl, sleb, shapley, bi, angular) are the rows of
bench/results/real.json measured under the same protocol, computed here when missing. Every row is
written to bench/results/search.json as soon as it is measured; a rerun skips the rows there.

Cost: each search's evaluations, wall time, and its overhead = search wall time / time inside the
fitness (forward + KL for sparsity; the mask evaluator for depth); the level database's size on
disk against the model's linear weights (fp32).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write  # noqa: E402

import layerprune as lp  # noqa: E402

CALIB, HELDOUT = "fixture:val", "fixture:test"
RESULTS = HERE / "results" / "search.json"
REAL = HERE / "results" / "real.json"
SPARSITY = [
    ("wanda", 0.7),
    ("sparsegpt", 0.7),
    ("wanda", 0.6),
    ("wanda", 0.8),
    ("sparsegpt", 0.6),
    ("sparsegpt", 0.8),
]
DEPTH = (6, 9)
DEPTH_BASELINES = ("ppl", "sleb", "shapley", "bi", "angular")
EXHAUSTIVE = 2000  # --transfer evaluates every removal set when there are at most this many
FITNESS_SIZES = (16, 64)  # ... under fitness sets of these many 128-token windows


def markdown(doc: dict) -> str:
    """The README's tables from search.json."""
    out = []
    for model, rows in doc.items():
        if not isinstance(rows, dict) or "protocol" not in rows:
            continue
        out += [f"{model}:", "", "| row | fitness | uniform | OWL | AlphaPruning | searched | searched / best | stitched | started from | "
                "evaluations | search s | overhead | level database / linear weights |", "|---" * 13 + "|"]  # fmt: skip
        for key, r in rows.items():
            if key == "protocol" or "target" not in r:
                continue
            b = r["baselines_heldout_ppl"]
            st = r.get("stitched_heldout_ppl")
            f = {"kind": "kl", "samples": 16, "seqlen": 128, **r.get("fitness", {})}
            out.append(f"| {key} | {f['kind'].upper()} {f['samples']} × {f['seqlen']} | {b['uniform']:.2f} | {b['owl']:.2f} | {b['alpha']:.2f} | {r['searched_heldout_ppl']:.2f} | "
                       f"{r['ratio_to_best_baseline']:.3f} | {'–' if st is None else f'{st:.2f}'} | {r['started_from']} | "
                       f"{r['evaluations']} | {r['search_seconds']:.0f} | "
                       f"{r['overhead']:.3f} | {r['database_over_linear_weights']:.2f} |")  # fmt: skip
        for key, r in rows.items():  # --bound: what any allocation could give, and on unseen windows
            if "bound" not in r:
                continue
            a = r["bound"]["allocations"]
            cols = [c for c in next(iter(a.values())) if c.startswith(("applied_", "stitched_heldout"))]
            out += ["", f"{key}, bound ({r['bound']['generations']} generations, NLL on the protocol's held-out windows): "
                    "held-out perplexity of each allocation", "",
                    "| allocation | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
            for name, v in a.items():
                out.append(f"| {name} | " + " | ".join(f"{v[c]:.2f}" for c in cols) + " |")
        depth = {k: r for k, r in rows.items() if k.startswith("depth-")}
        if depth:
            names = list(next(iter(depth.values()))["baselines_heldout_ppl"])
            out += ["", "| row | fitness | " + " | ".join(names) + " | searched | searched / best | on 128 windows: searched / best "
                    "| blocks | evaluations | search s | overhead |", "|---" * (len(names) + 9) + "|"]  # fmt: skip
            for key, r in depth.items():
                b = r["baselines_heldout_ppl"]
                f = r.get("fitness", {"samples": 16, "seqlen": 128})
                large = r.get("heldout_ppl_128x512") or {
                    n: v["heldout_ppl_128x512"] for n, v in r.get("transfer_shift", {}).items()
                }  # the first rows: measured afterwards by --shift 128
                best = min((v for n, v in large.items() if n != "searched"), default=None)
                wide = (
                    f"{large['searched']:.2f} / {best:.2f} = {large['searched'] / best:.3f}" if best else "–"
                )
                out.append(f"| {key} | {f['samples']} × {f['seqlen']} | " + " | ".join(f"{b[n]:.2f}" for n in names) +
                           f" | {r['searched_heldout_ppl']:.2f} | {r['ratio_to_best_baseline']:.3f} | {wide} | "
                           f"{' '.join(r['blocks'])} | {r['evaluations']} | {r['search_seconds']:.0f} | {r['overhead']:.3f} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def transfer(lm, load, row: dict, baselines: dict, seqlen: int) -> dict:
    """Does the fitness rank the depth sets as the held-out text does? Each set (the searched one
    and every baseline's) on the search's own fitness windows (16 x 128 of the calibration text, the
    same draw), on 16 x 512 of it (the context, if shorter), and held out on the protocol's 8 windows and on 64."""
    from layerprune.engine.masked import MaskEvaluator
    from layerprune.planners.width_search import fitness_calibration
    from layerprune.plans import DepthPlan
    from layerprune.scorers.run import model_info

    k = row["remove"]
    sets = {"searched": row["blocks"]}
    for method in row["baselines_heldout_ppl"]:
        got = baselines.get("depth", {}).get(f"{method}-{k}")
        if got is not None:
            sets[method] = got["blocks"]
    base = lp.calibration(lm, CALIB, kind="depth")  # the windows the search's fitness is drawn like
    L = lm.adapter.num_blocks
    masks = [[0 if str(j) in s else 1 for j in range(L)] for s in sets.values()]
    out = {name: {"blocks": blocks} for name, blocks in sets.items()}
    long = min(512, lm.adapter.context_length or 512)
    for label, n, sl in (("fitness_ppl_16x128", 16, 128), (f"calibration_ppl_16x{long}", 16, long)):
        fw = fitness_calibration(lm, base, n, sl)
        ev = MaskEvaluator(
            lm.model, lm.adapter, fw.input_ids, granularity="block", batch_size=8, progress=False
        )
        for name, v in zip(sets, ev.ppl(masks)):
            out[name][label] = v
    if math.comb(L, k) <= EXHAUSTIVE:  # every set: is the search's set the fitness optimum, and where
        # does the held-out text rank the fitness optimum and the searched set?
        from scipy.stats import spearmanr

        held = text_windows(lm, HELDOUT, seqlen, 8)
        combos = list(itertools.combinations(range(L), k))
        every = [[0 if j in c else 1 for j in range(L)] for c in combos]

        def ppl_of_every(ids):
            ev = MaskEvaluator(lm.model, lm.adapter, ids, granularity="block", batch_size=8, progress=False)
            return list(ev.ppl(every))

        hel = ppl_of_every(held.input_ids)
        searched = combos.index(tuple(sorted(int(b) for b in row["blocks"])))
        best_held = min(range(len(combos)), key=hel.__getitem__)
        rank = lambda v, i: 1 + sum(x < v[i] for x in v)  # noqa: E731
        ex = out["exhaustive"] = {
            "sets": len(combos),
            "heldout_optimum": {"blocks": [str(j) for j in combos[best_held]], "heldout_ppl_8": hel[best_held]},
            "searched_heldout_rank": rank(hel, searched),
            "note": "held-out through the mask evaluator on the protocol's 8 windows (the NLL of apply + perplexity); "
                    "fitness_N: the search's fitness on N windows of 128 tokens of the calibration text (N = 16: its own)",
        }  # fmt: skip
        for n in FITNESS_SIZES:
            fit = ppl_of_every(fitness_calibration(lm, base, n, 128).input_ids)
            best = min(range(len(combos)), key=fit.__getitem__)
            ex[f"fitness_{n}"] = {
                "optimum": [str(j) for j in combos[best]], "optimum_heldout_ppl_8": hel[best],
                "optimum_heldout_rank": rank(hel, best), "searched_rank": rank(fit, searched),
                "spearman_to_heldout": float(spearmanr(fit, hel).statistic),
            }  # fmt: skip
    for name, blocks in sets.items():
        m = load()
        plan = DepthPlan(model=model_info(lm), method="manual", remove=list(blocks))
        lp.apply(m, plan)
        for windows in (8, 64):
            ppl = lp.perplexity(m, HELDOUT, seqlen=seqlen, max_windows=windows, progress=False).ppl
            out[name][f"heldout_ppl_{windows}"] = ppl
    return out


def sets_ppl(lm, sets: dict, source: str, windows: int, seqlen: int) -> tuple[str, dict]:
    """Perplexity without each removal set on the first `windows` windows of `seqlen` tokens of the
    text (the mask evaluator: the NLL of apply + perplexity); the label names the windows."""
    from layerprune.engine.masked import MaskEvaluator

    L = lm.adapter.num_blocks
    masks = [[0 if str(j) in s else 1 for j in range(L)] for s in sets.values()]
    w = text_windows(lm, source, seqlen, windows)
    ev = MaskEvaluator(lm.model, lm.adapter, w.input_ids, granularity="block", batch_size=8, progress=False)
    return f"{w.input_ids.shape[0]}x{seqlen}", dict(zip(sets, ev.ppl(masks)))


def shift(lm, row: dict, windows: int, seqlen: int) -> dict:
    """Is the gap between fitness and held-out a difference between the two texts? Every set of the
    row's transfer on the first `windows` windows of `seqlen` tokens of the calibration text and of the
    held-out text."""
    sets = {name: r["blocks"] for name, r in row["transfer"].items() if name != "exhaustive"}
    out = {name: {} for name in sets}
    for label, source in (("calibration", CALIB), ("heldout", HELDOUT)):
        size, ppl = sets_ppl(lm, sets, source, windows, seqlen)
        for name, v in ppl.items():
            out[name][f"{label}_ppl_{size}"] = v
    return out


def text_windows(lm, source: str, seqlen: int, windows: int):
    """The first `windows` windows of `seqlen` tokens of a text, as `lp.perplexity` reads them."""
    from layerprune.data.text import load_text
    from layerprune.data.windows import default_bos, eval_windows

    return eval_windows(lm.tokenizer, load_text(source, source.rsplit(":", 1)[-1]), seqlen,
                        default_bos(lm.tokenizer, lm.adapter), windows)  # fmt: skip


def heuristic_plan(lm, allocation: str, pruner: str, target: float, calib):
    """A baseline allocation's plan (AlphaPruning with clip on, as this bench has always made it)."""
    return lp.plan(lm, sparsity=target, allocation=allocation, pruner=pruner, calib=calib, progress=False,
                   clip=allocation == "alpha")  # fmt: skip


def bound(lm, load, section: dict, key: str, calib, work: Path, seqlen: int, args) -> dict:
    """How much can any allocation give, and does it hold on text no search saw? Not a method: the row's
    search (its level database, grid and seeds) with the fitness = NLL on the protocol's 8 held-out windows
    themselves, `--bound-generations` generations. Then every allocation (uniform, OWL, AlphaPruning, the
    searched plans of `--bound-plans`, the bound's) applied as `apply` does and stitched from the database,
    on the protocol's windows (0-7), on the next `--bound-unseen` windows of the held-out text (seen by no
    search, the bound's included), and stitched on the row's fitness windows (16 x 128, 16 x 512)."""
    from dataclasses import replace

    from layerprune.engine.levels import LevelDatabase
    from layerprune.evaluation.perplexity import perplexity_of_windows
    from layerprune.planners.sparsity_search import level_grid, search_plan
    from layerprune.planners.width_search import fitness_calibration
    from layerprune.plans import Plan

    row = section[key]
    pruner, target, levels = row["pruner"], row["target"], row["max_levels"]
    n = args.heldout_windows
    w = text_windows(lm, HELDOUT, seqlen, n + args.bound_unseen)
    if w.input_ids.shape[0] < n + args.bound_unseen:
        raise SystemExit(
            f"{HELDOUT} has {w.input_ids.shape[0]} windows of {seqlen}; use a smaller --bound-unseen"
        )
    # the protocol's windows, with their own fingerprint (the store's)
    seen = text_windows(lm, HELDOUT, seqlen, n)
    sets = {
        f"heldout_0-{n - 1}": seen,
        f"heldout_{n}-{n + args.bound_unseen - 1}": replace(w, input_ids=w.input_ids[n:]),
    }
    fits = {f"fitness_16x{sl}": fitness_calibration(lm, calib, 16, sl) for sl in (128, 512)}
    db = LevelDatabase(work / f"levels-{pruner}-{target}")  # built by the row's search
    grid = level_grid(lm, target, max_levels=levels)
    db.check(lm, pruner, grid.layer_sparsities(), row.get("level_inputs", "target"))
    plans = {a: heuristic_plan(lm, a, pruner, target, calib) for a in ("uniform", "owl", "alpha")}
    seeds = {a: plans[a].layers for a in ("owl", "alpha")}  # the search seeds itself with these allocations
    name = f"{key}-bound"
    t0 = time.perf_counter()
    plan = search_plan(lm, grid, db, pruner, calib, seen, seeds=seeds, fitness="nll", generations=args.bound_generations,
                       offspring=args.offspring, store=str(work / f"{name}.sqlite"), log=str(work / f"{name}.jsonl"),
                       progress=not args.quiet)  # fmt: skip
    plan.save(work / f"{name}.plan.json")
    out = {"generations": args.bound_generations, "search_seconds": time.perf_counter() - t0,
           "best_fitness_nll": plan.extra["best_fitness"], "seeds_fitness_nll": plan.extra["seeds_fitness"],
           "evaluations": plan.extra["evaluations"], "allocations": {}}  # fmt: skip
    for k in filter(None, args.bound_plans.split(",")):
        plans[k] = Plan.load(work / f"{k}.plan.json")
    plans["bound"] = plan
    for label, p in plans.items():
        r = {}
        # a heuristic's targets at the nearest levels (as it seeds the search)
        on_grid = grid.targets(grid.genome_of(p.layers))
        db.assign(lm.adapter, {n: (s if s > 1e-12 else None) for n, s in on_grid.items()})
        for k, ws in {**sets, **fits}.items():
            r[f"stitched_{k}"] = perplexity_of_windows(lm.model, lm.adapter, ws, progress=False).ppl
        db.restore(lm.adapter)
        m = load()
        lp.apply(m, p, calib, progress=False)
        for k, ws in sets.items():
            r[f"applied_{k}"] = perplexity_of_windows(m.model, m.adapter, ws, progress=False).ppl
        out["allocations"][label] = r
        print(name, label, json.dumps(r), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--only", default=None, help="rows to run, e.g. wanda-0.7,depth-6")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--depth-generations", type=int, default=40)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument(
        "--max-levels", type=int, default=8, help="levels each side of the target (Wanda, magnitude)"
    )
    ap.add_argument(
        "--sparsegpt-max-levels", type=int, default=4, help="SparseGPT: its levels are full weights"
    )
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--fitness-samples", type=int, default=16, help="sparsity searches: fitness windows")
    ap.add_argument("--fitness-seqlen", type=int, default=128, help="sparsity searches: their length")
    ap.add_argument(
        "--fitness",
        default="kl",
        choices=("kl", "nll"),
        help="sparsity searches: KL to the dense model or NLL",
    )
    ap.add_argument(
        "--granularity", default="layer", help="sparsity searches: one level per linear layer or per block"
    )
    ap.add_argument(
        "--suffix",
        default="",
        help="appended to the rows' keys, e.g. -fit512 (a variant beside the row)",
    )
    ap.add_argument(
        "--redo", default="", help="rows to measure again, e.g. wanda-0.7 (its store resumes the search)"
    )
    ap.add_argument(
        "--transfer",
        action="store_true",
        help="depth rows: every set (searched, baselines) on the search's fitness windows, on 16 x 512 "
        "of the calibration text and on 8 / 64 held-out windows; written into the row, then stop",
    )
    ap.add_argument(
        "--shift",
        type=int,
        default=0,
        metavar="N",
        help="depth rows with a transfer: every set on N windows of the calibration text and N of the "
        "held-out text; written into the row as transfer_shift, then stop",
    )
    ap.add_argument("--depth-fitness-samples", type=int, default=16, help="depth searches: fitness windows")
    ap.add_argument("--depth-fitness-seqlen", type=int, default=128, help="depth searches: their length")
    ap.add_argument(
        "--depth-survivors", default="4", help="depth searches: children kept after each stage but the last"
    )
    ap.add_argument(
        "--depth-seed-plans",
        action="store_true",
        help="depth searches start from the baselines' removal sets in real.json (as plans) instead of "
        "shapley / sleb score files and ppl / bi computed on the fitness windows",
    )
    ap.add_argument(
        "--large-heldout",
        type=int,
        default=128,
        help="depth rows: every set also held out on this many windows (0: not)",
    )
    ap.add_argument(
        "--bound",
        action="store_true",
        help="sparsity rows: the search with its fitness on the held-out windows themselves (a bound, not a "
        "method) and every allocation on held-out windows no search saw; written into the row, then stop",
    )
    ap.add_argument("--bound-generations", type=int, default=40)
    ap.add_argument(
        "--bound-unseen", type=int, default=32, help="--bound: held-out windows after the protocol's"
    )
    ap.add_argument(
        "--bound-plans",
        default="",
        help="--bound: searched rows whose plans are compared, e.g. sparsegpt-0.7-nll",
    )
    ap.add_argument(
        "--device", default="cpu", help="where the model runs (cuda: never measured yet; rows record it)"
    )
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--markdown", action="store_true", help="print the README's tables from search.json and stop"
    )
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    real = args.model == "smollm2"
    seqlen = 512 if real else 128
    work = HERE / "work" / ("search" if real else "search-fixture")
    work.mkdir(parents=True, exist_ok=True)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    section = doc.setdefault(args.model, {})
    baselines = json.loads(REAL.read_text()) if real and REAL.exists() else {}
    only = set(args.only.split(",")) if args.only else None
    for key in filter(None, args.redo.split(",")):
        section.pop(key, None)

    def load():
        return lp.load(args.model, device=args.device, quiet=True)

    def heldout(lm) -> float:
        return lp.perplexity(lm, HELDOUT, seqlen=seqlen, max_windows=args.heldout_windows, progress=False).ppl

    def put(key, row):  # re-read first and write this row only: another run may write the file meanwhile
        if args.device != "cpu":
            row = {**row, "device": args.device}
        section[key] = row
        fresh = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        fresh.setdefault(args.model, {}).update({"protocol": section["protocol"], key: row})
        write(fresh, RESULTS)

    lm = load()
    model_bytes = sum(lm.adapter.layer(n).weight.numel() * 4 for n in lm.adapter.layer_names())
    section.setdefault("protocol", {
        "calibration": CALIB, "heldout": HELDOUT, "heldout_seqlen": seqlen, "heldout_windows": args.heldout_windows,
        "apply_calibration": {"samples": 16, "seqlen": seqlen}, "fitness": {"samples": 16, "seqlen": 128},
        "offspring": args.offspring, "survivors": [4, 1], "linear_weights_bytes_fp32": model_bytes,
    })  # fmt: skip
    if args.transfer:
        for key in [k for k in section if k.startswith("depth-") and (not only or k in only)]:
            put(key, {**section[key], "transfer": transfer(lm, load, section[key], baselines, seqlen)})
            print(key, json.dumps(section[key]["transfer"], indent=1), flush=True)
        return
    if args.shift:
        for key in [
            k
            for k in section
            if k.startswith("depth-") and "transfer" in section[k] and (not only or k in only)
        ]:
            put(key, {**section[key], "transfer_shift": shift(lm, section[key], args.shift, seqlen)})
            print(key, json.dumps(section[key]["transfer_shift"], indent=1), flush=True)
        return
    calib = lp.calibration(lm, CALIB, samples=16, seqlen=seqlen, kind="sparsity")
    if args.bound:
        for key in [k for k in section if k in (only or ())]:
            put(key, {**section[key], "bound": bound(lm, load, section, key, calib, work, seqlen, args)})
        return
    for pruner, target in SPARSITY:
        key = f"{pruner}-{target}{args.suffix}"
        if key in section or (only and key not in only):
            continue
        base = {}
        for allocation in ("uniform", "owl", "alpha"):
            row = baselines.get("sparsity", {}).get(f"{allocation}-{pruner}-{target}")
            if row is None:
                m = load()
                plan = heuristic_plan(m, allocation, pruner, target, calib)
                lp.apply(m, plan, calib, progress=False)
                base[allocation] = heldout(m)
            else:
                base[allocation] = row["heldout_ppl"]
        levels = args.sparsegpt_max_levels if pruner == "sparsegpt" else args.max_levels
        m = load()
        t0 = time.perf_counter()
        plan = lp.plan(m, sparsity=target, allocation="search", pruner=pruner, calib=calib, fitness=args.fitness,
                       fitness_samples=args.fitness_samples, fitness_seqlen=args.fitness_seqlen, generations=args.generations, offspring=args.offspring, max_levels=levels,
                       granularity=args.granularity,
                       levels_db=str(work / f"levels-{pruner}-{target}{'' if args.granularity == 'layer' else '-block'}"), store=str(work / f"{key}.sqlite"),
                       log=str(work / f"{key}.jsonl"), progress=not args.quiet)  # fmt: skip
        plan_seconds = time.perf_counter() - t0
        plan.save(work / f"{key}.plan.json")
        from layerprune.engine.levels import LevelDatabase

        db = LevelDatabase(
            plan.extra["level_database"]["path"]
        )  # the model the search evaluated (EvoPress's)
        db.assign(m.adapter, {n: (s if s > 1e-12 else None) for n, s in plan.layers.items()})
        stitched = heldout(m)
        db.restore(m.adapter)
        lp.apply(m, plan, calib, progress=False)
        ppl = heldout(m)
        e = plan.extra
        best_name = min(base, key=base.get)
        inside = e["forward_seconds_total"]
        put(key, {
            "pruner": pruner, "target": target, "searched_heldout_ppl": ppl, "baselines_heldout_ppl": base,
            "stitched_heldout_ppl": stitched, "level_inputs": plan.params.get("level_inputs", "target"),
            "best_baseline": best_name, "ratio_to_best_baseline": ppl / base[best_name],
            "started_from": e["start"], "seeds_fitness": e["seeds_fitness"], f"best_fitness_{args.fitness}": e["best_fitness"],
            "evaluations": e["evaluations"], "evaluations_this_run": e["evaluations_this_run"],
            "generations": plan.params["generations"], "search_seconds": e["search_seconds"],
            "fitness_seconds": inside, "assign_seconds": e["assign_seconds_total"],
            "overhead": e["search_seconds"] / inside if inside else None,
            "plan_seconds_with_database_and_seeds": plan_seconds,
            "level_database_bytes": e["level_database"]["bytes"], "level_database_kind": e["level_database"]["kind"],
            "database_over_linear_weights": e["level_database"]["bytes"] / model_bytes,
            "granularity": args.granularity,
            "fitness": {"kind": args.fitness, "samples": args.fitness_samples, "seqlen": args.fitness_seqlen,
                        "stage_windows": plan.params.get("stage_windows")},
            "achieved": plan.params["achieved"], "max_levels": levels, "level_step": plan.params["level_step_weights"],
        })  # fmt: skip
        print(
            f"{key}: searched {ppl:.2f} vs {best_name} {base[best_name]:.2f} (x{ppl / base[best_name]:.3f})",
            flush=True,
        )
    for k in DEPTH if real else (3, 4):
        key = f"depth-{k}{args.suffix}"
        if key in section or (only and key not in only):
            continue
        base = {}
        for method in DEPTH_BASELINES:
            row = baselines.get("depth", {}).get(f"{method}-{k}")
            if row is None:  # not in real.json (the fixture): scored here on the depth papers' 10 x 128
                m = load()
                options = {"sleb": {"steps": k}, "shapley": {"budget": 64}}.get(method, {})
                scores = lp.score(
                    m, method, lp.calibration(m, CALIB, samples=10, seqlen=128), progress=False, **options
                )
                lp.apply(m, lp.plan(m, scores, remove=k))
                base[method] = heldout(m)
            else:
                base[method] = row["heldout_ppl"]
        seeds = [
            p
            for p in (HERE / "work" / "real" / f"depth-{m}.json" for m in ("shapley", "sleb"))
            if real and p.exists()
        ]
        sets = {}  # each baseline's removal set, where real.json has it
        for method in DEPTH_BASELINES:
            got = baselines.get("depth", {}).get(f"{method}-{k}")
            if got is not None:
                sets[method] = got["blocks"]
        if args.depth_seed_plans:
            from layerprune.plans import DepthPlan
            from layerprune.scorers.run import model_info

            seeds = [
                DepthPlan(model=model_info(lm), method=name, remove=blocks) for name, blocks in sets.items()
            ]
        m = load()
        survivors = tuple(int(x) for x in args.depth_survivors.split(","))
        plan = lp.plan(m, remove=k, allocation="search", calib=CALIB, fitness_samples=args.depth_fitness_samples,
                       fitness_seqlen=args.depth_fitness_seqlen, seed_scores=seeds, generations=args.depth_generations,
                       offspring=args.offspring, survivors=survivors, store=str(work / f"{key}.sqlite"),
                       log=str(work / f"{key}.jsonl"), progress=not args.quiet)  # fmt: skip
        plan.save(work / f"{key}.plan.json")
        lp.apply(m, plan)
        ppl = heldout(m)
        e = plan.extra
        best_name = min(base, key=base.get) if base else None
        large = {}
        if args.large_heldout:  # the protocol's 8 windows are 4 K tokens of one stretch of the text
            sets = {"searched": plan.remove, **sets}
            size, large = sets_ppl(lm, sets, HELDOUT, args.large_heldout, seqlen)
            best_large = min((n for n in large if n != "searched"), key=large.get, default=None)
        put(key, {
            "remove": k, "blocks": plan.remove, "searched_heldout_ppl": ppl, "baselines_heldout_ppl": base,
            "best_baseline": best_name, "ratio_to_best_baseline": ppl / base[best_name] if base else None,
            "started_from": e["start"], "seeds_fitness": e["seeds_fitness"], "calibration_ppl": e["calibration_ppl"],
            "evaluations": e["evaluations"], "generations": plan.params["generations"],
            "search_seconds": e["search_seconds"], "fitness_seconds": e["fitness_seconds_total"],
            "overhead": e["search_seconds"] / e["fitness_seconds_total"] if e["fitness_seconds_total"] else None,
            "fitness": {"samples": args.depth_fitness_samples, "seqlen": args.depth_fitness_seqlen,
                        "survivors": list(survivors), "stage_windows": plan.params["stage_windows"],
                        "seeds": "baseline plans" if args.depth_seed_plans else "scores"},
            **({f"heldout_ppl_{size}": large, f"ratio_to_best_baseline_{size}": large["searched"] / large[best_large]}
               if large and best_large else {}),
        })  # fmt: skip
        print(
            f"{key}: searched {plan.remove} {ppl:.2f} vs {best_name} {base.get(best_name, float('nan')):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
