"""The seed papers' tables on a real pretrained LLM: SmolLM2-135M-Instruct (the `smollm2` named model,
dequantized from its Q4_1 GGUF), on 2 CPU cores.

    python bench/real.py [--sections depth,sparsity,width,recovery,zeroshot,speed,cost] [--fresh]
    python bench/real.py --report          # bench/results/real_report/ from the exported models

Resumable: every row is written to bench/results/real.json as soon as it is measured, and a rerun
skips the rows already there (`--fresh` redoes the sections named). Text protocol, disjoint by
construction (the fixture's documents go to train / val / test by a hash of their text):
calibration = fixture:val, recovery training = fixture:train, held-out = fixture:test (the first
--heldout-windows windows of 512 tokens, BOS policy of the tokenizer).

Sizes are scaled to 2 CPU cores (one dense forward of the model is ~300 tokens/s here) and recorded:
depth scoring 10 x 128 (the depth papers' size); Wanda / SparseGPT / OWL / Wanda-sp 16 x 512; the width
search's fitness 5 x 128 with population 12, 6 generations of 4 crossovers + 4 mutations.

Cost: each stage's wall time is divided by one dense forward over the same windows measured in the
same process ("forwards"), next to the number of forwards the algorithm needs ("estimate", from the
engine's own block-forward counters where it has them); the ratio carries to larger models.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.evaluation.perplexity import perplexity_of_windows  # noqa: E402

MODEL = "smollm2"
CALIB, TRAIN, HELDOUT = "fixture:val", "fixture:train", "fixture:test"
SECTIONS = ("depth", "sparsity", "width", "recovery", "zeroshot", "speed", "cost")
DEPTH_METHODS = ("ppl", "taylor", "bi", "angular", "sleb", "shapley")
REMOVE = (3, 6, 9)
TARGETS = (0.5, 0.6, 0.7, 0.8)
EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5)
WIDTHS = (0.2, 0.3)
SEARCH = {"population": 12, "iterations": 6, "crossovers": 4, "mutations": 4}
SIZES = {"depth": (10, 128), "sparsity": (16, 512), "fitness": (5, 128)}
WORK = HERE / "work" / "real"  # exported models and scores (not committed)
HELDOUT_SEQLEN = 512
SHAPLEY_BUDGET = 256


class Results:
    """bench/results/real.json: sections of rows keyed by id, rewritten atomically after each row."""

    def __init__(self, path: Path, fresh: tuple[str, ...] = ()):
        self.path = path
        self.doc = json.loads(path.read_text()) if path.exists() else {}
        self.doc.setdefault("benchmark", "the seed papers' tables on SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)")
        for s in fresh:
            self.doc.pop(s, None)

    def has(self, section: str, key: str) -> bool:
        return key in self.doc.get(section, {})

    def get(self, section: str, key: str) -> dict:
        return self.doc[section][key]

    def put(self, section: str, key: str, row: dict) -> dict:
        self.doc.setdefault(section, {})[key] = row
        write(self.doc, self.path)
        return row


def load(quiet: bool = True):
    return lp.load(MODEL, device="cpu", quiet=quiet)


def heldout(lm, windows: int) -> float:
    return lp.perplexity(lm, HELDOUT, seqlen=HELDOUT_SEQLEN, max_windows=windows, progress=False).ppl


def forward_seconds(lm, windows) -> float:
    """One forward of the dense model over `windows` (the cost unit), after a warm-up."""
    perplexity_of_windows(
        lm.model, lm.adapter, lp.Windows(windows.input_ids[:1, :16], {}), 16, progress=False
    )
    t0 = time.perf_counter()
    perplexity_of_windows(lm.model, lm.adapter, windows, 16, progress=False)
    return time.perf_counter() - t0


def protocol(res: Results, args) -> None:
    lm = load()
    heldout_ppl = lp.perplexity(
        lm, HELDOUT, seqlen=HELDOUT_SEQLEN, max_windows=args.heldout_windows, progress=False
    )
    res.doc["protocol"] = {
        "model": MODEL,
        "weights": lm.origin,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "blocks": lm.adapter.num_blocks,
        "calibration_text": CALIB,
        "training_text": TRAIN,
        "heldout": heldout_ppl.protocol,
        "sizes": {k: {"samples": n, "seqlen": s} for k, (n, s) in SIZES.items()},
        "search": SEARCH,
        "threads": torch.get_num_threads(),
        "note": "texts disjoint: each fixture document goes to one split by a hash of its text",
    }
    res.doc["dense"] = {"heldout_ppl": heldout_ppl.ppl}
    write(res.doc, res.path)
    print(f"dense held-out ppl {heldout_ppl.ppl:.3f} ({heldout_ppl.protocol['tokens']} tokens)", flush=True)


# ---- depth ----------------------------------------------------------------------------------------
def depth(res: Results, args) -> None:
    lm = load()
    calib = lp.calibration(lm, CALIB, samples=SIZES["depth"][0], seqlen=SIZES["depth"][1])
    unit = forward_seconds(lm, calib)
    L = lm.adapter.num_blocks
    batches = math.ceil(calib.input_ids.shape[0] / 16)
    options = {"sleb": {"steps": max(REMOVE)}, "shapley": {"budget": SHAPLEY_BUDGET, "ratio": 0.2}}
    for method in DEPTH_METHODS:
        if all(res.has("depth", f"{method}-{k}") for k in REMOVE):
            continue
        lm = load()
        t0 = time.perf_counter()
        scores = lp.score(lm, method, calib, progress=not args.quiet, **options.get(method, {}))
        seconds = time.perf_counter() - t0
        scores.save(WORK / f"depth-{method}.json")
        calls = scores.extra.get("block_calls") if scores.extra else None
        estimate = calls / (L * batches) if calls else {"taylor": 3.0, "bi": 1.0, "angular": 1.0}[method]
        for k in REMOVE:
            plan = lp.plan(lm, scores, remove=k)
            pruned = load()
            lp.apply(pruned, plan)
            ppl = heldout(pruned, args.heldout_windows)
            res.put("depth", f"{method}-{k}", {
                "method": method, "remove": k, "blocks": plan.remove, "protected": plan.params.get("protected"),
                "heldout_ppl": ppl, "scorer_seconds": seconds, "forwards": seconds / unit,
                "estimate_forwards": estimate, "unit_seconds": unit, "options": options.get(method, {}),
            })  # fmt: skip
            print(f"depth {method:8s} -{k}: {plan.remove} held-out {ppl:.2f} ({seconds:.0f}s)", flush=True)
            if method == "ppl" and k == REMOVE[1]:
                lp.export(pruned, WORK / "depth-ppl-6", plan, overwrite=True)


# ---- sparsity -------------------------------------------------------------------------------------
def sparsity(res: Results, args) -> None:
    lm = load()
    calib = lp.calibration(
        lm, CALIB, samples=SIZES["sparsity"][0], seqlen=SIZES["sparsity"][1], kind="sparsity"
    )
    unit = forward_seconds(lm, calib)
    t0 = time.perf_counter()
    alpha = lp.score(lm, "alpha", progress=False)
    alpha_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    owl = lp.score(lm, "owl", calib, progress=False)
    owl_seconds = time.perf_counter() - t0
    res.doc.setdefault("sparsity_scores", {}).update(
        alpha_seconds=alpha_seconds, owl_seconds=owl_seconds, owl_forwards=owl_seconds / unit,
        alpha_block_values=alpha.extra["block_values"], owl_outlier_ratio=owl.importance,
    )  # fmt: skip
    configs = [(t, a, p, None, None) for t in TARGETS for a in ("uniform", "owl", "alpha") for p in ("magnitude", "wanda", "sparsegpt")]  # fmt: skip
    configs += [(0.5, "uniform", p, "2:4", None) for p in ("magnitude", "wanda", "sparsegpt")]
    configs += [(0.7, "alpha", "wanda", None, e) for e in EPSILONS if e != 0.2]  # 0.2: alpha-wanda-0.7
    for target, allocation, pruner, nm, eps in configs:
        key = f"{allocation}-{pruner}-{nm or target}" + (f"-eps{eps}" if eps is not None else "")
        if res.has("sparsity", key):
            continue
        lm = load()
        kw = {"allocation": allocation, "pruner": pruner, "nm": nm}
        if allocation != "uniform":
            kw["scores"] = alpha if allocation == "alpha" else owl
        if allocation == "alpha":
            kw["epsilon"] = eps if eps is not None else (0.3 if pruner == "magnitude" else 0.2)
        t0 = time.perf_counter()
        clipped = False
        try:
            plan = lp.plan(
                lm, sparsity=target, calib=calib if pruner != "magnitude" else None, progress=False, **kw
            )
        except LayerpruneError:  # the reference's eps gives a layer sparsity >= 1: clip and re-normalise
            plan = lp.plan(lm, sparsity=target, calib=calib if pruner != "magnitude" else None, progress=False, clip=True, **kw)  # fmt: skip
            clipped = True
        counts = lp.apply(lm, plan, calib if pruner != "magnitude" else None, progress=False)
        seconds = time.perf_counter() - t0
        ppl = heldout(lm, args.heldout_windows)
        res.put("sparsity", key, {
            "target": target, "allocation": allocation, "pruner": pruner, "nm": nm,
            "epsilon": kw.get("epsilon"), "clipped": clipped, "heldout_ppl": ppl,
            "achieved": counts.get("achieved_mean_sparsity"), "apply_seconds": seconds, "forwards": seconds / unit,
            "estimate_forwards": 0.0 if pruner == "magnitude" else 2.0, "unit_seconds": unit,
        })  # fmt: skip
        print(f"sparsity {key:28s} held-out {ppl:9.2f} ({seconds:.0f}s)", flush=True)
        if key == "alpha-wanda-0.7":
            lp.export(lm, WORK / "alpha-wanda-70", plan, overwrite=True)


# ---- width ----------------------------------------------------------------------------------------
def width(res: Results, args) -> None:
    lm = load()
    calib = lp.calibration(lm, CALIB, samples=SIZES["sparsity"][0], seqlen=SIZES["sparsity"][1], kind="width")
    unit = forward_seconds(lm, calib)
    fit_unit = forward_seconds(
        lm, lp.calibration(lm, CALIB, samples=SIZES["fitness"][0], seqlen=SIZES["fitness"][1])
    )
    scored = {}
    for pruner in ("wanda-sp", "magnitude-sp"):
        t0 = time.perf_counter()
        scored[pruner] = lp.score(
            lm, pruner, calib if pruner == "wanda-sp" else None, unit="module", progress=False
        )
        res.doc.setdefault("width_scores", {})[pruner] = {"seconds": time.perf_counter() - t0}
    dense_params = sum(p.numel() for p in lm.model.parameters())
    runs = [(w, a, p, None) for w in WIDTHS for p in scored for a in ("uniform", "owl", "alpha")]
    runs += [(w, "search", "wanda-sp", s) for w in WIDTHS for s in (0, 1, 2)]
    runs += [(w, "search", "magnitude-sp", 0) for w in WIDTHS]
    runs += [(w, "flap", "flap", None) for w in WIDTHS]
    for target, allocation, pruner, seed in runs:
        key = f"{allocation}-{pruner}-{target}" + (f"-seed{seed}" if seed is not None else "")
        if res.has("width", key):
            continue
        lm = load()
        kw: dict = {"allocation": allocation}
        if allocation == "search":
            kw.update(
                SEARCH, seed=seed, fitness_samples=SIZES["fitness"][0], fitness_seqlen=SIZES["fitness"][1]
            )
        t0 = time.perf_counter()
        try:
            if pruner == "flap":
                plan = lp.plan(lm, width=target, calib=calib, progress=False, **kw)
            else:
                plan = lp.plan(lm, width=target, scores=scored[pruner], calib=calib, progress=False, **kw)
        except LayerpruneError as e:
            print(f"width {key}: {e}", flush=True)
            res.put(
                "width", key, {"target": target, "allocation": allocation, "pruner": pruner, "error": str(e)}
            )
            continue
        plan_seconds = time.perf_counter() - t0
        lp.apply(lm, plan, calib if pruner != "magnitude-sp" else None, progress=False)
        seconds = time.perf_counter() - t0
        ppl = heldout(lm, args.heldout_windows)
        row = {
            "target": target, "allocation": allocation, "pruner": pruner, "seed": seed,
            "achieved": plan.params.get("achieved"), "heldout_ppl": ppl,
            "parameters": sum(p.numel() for p in lm.model.parameters()), "dense_parameters": dense_params,
            "plan_seconds": plan_seconds, "seconds": seconds, "unit_seconds": unit,
        }  # fmt: skip
        if allocation == "search":
            ev = plan.extra["evaluations_this_run"]
            row.update(best_fitness=plan.extra["best_fitness"], evaluations=ev, fitness_unit_seconds=fit_unit,
                       forwards=plan_seconds / fit_unit, estimate_forwards=ev * (1 - target / 2))  # fmt: skip
        res.put("width", key, row)
        print(f"width {key:32s} held-out {ppl:9.2f} ({seconds:.0f}s)", flush=True)
        if key in ("search-wanda-sp-0.3-seed0", "uniform-wanda-sp-0.3"):
            lp.export(lm, WORK / key, plan, overwrite=True)


# ---- recovery -------------------------------------------------------------------------------------
def recovery(res: Results, args) -> None:
    steps, batch, seqlen = args.recover_steps, 4, 128
    for name in ("depth-ppl-6", "alpha-wanda-70"):
        for method in ("lora", "full"):
            key = f"{name}-{method}"
            if res.has("recovery", key):
                continue
            lm = lp.load(str(WORK / name), device="cpu", quiet=True)
            before = heldout(lm, args.heldout_windows)
            record = lp.recover(lm, TRAIN, method=method, seqlen=seqlen, steps=steps, batch_size=batch,
                                lr=1e-4 if method == "lora" else 2e-5, warmup=2, progress=not args.quiet)  # fmt: skip
            after = heldout(lm, args.heldout_windows)
            res.put("recovery", key, {
                "model": name, "method": method, "steps": record["steps"], "tokens": record["tokens"],
                "seconds": record["seconds"], "heldout_before": before, "heldout_after": after,
                "lr": 1e-4 if method == "lora" else 2e-5,
            })  # fmt: skip
            print(f"recovery {key:22s} {before:.2f} -> {after:.2f} ({record['seconds']:.0f}s)", flush=True)
            if method == "lora":
                lp.export(lm, WORK / f"{name}+lora", None, {"recovery": record}, overwrite=True)


# ---- zero-shot ------------------------------------------------------------------------------------
def best(res: Results, section: str, key=lambda r: True) -> str | None:
    rows = {k: r for k, r in res.doc.get(section, {}).items() if "heldout_ppl" in r and key(r)}
    return min(rows, key=lambda k: rows[k]["heldout_ppl"]) if rows else None


def zeroshot(res: Results, args) -> None:
    from layerprune.evaluation.zeroshot import zeroshot as run_zeroshot

    models = {"dense": None}
    for name in ("depth-ppl-6", "depth-ppl-6+lora", "alpha-wanda-70", "search-wanda-sp-0.3-seed0"):
        if (WORK / name).is_dir():
            models[name] = WORK / name
    for label, folder in models.items():
        if res.has("zeroshot", label):
            continue
        lm = load() if folder is None else lp.load(str(folder), device="cpu", quiet=True)
        t0 = time.perf_counter()
        zs = run_zeroshot(lm, "fixture", limit=args.zeroshot_limit, progress=False)
        tasks = {t: v[v["metric"]] for t, v in zs["tasks"].items()}
        res.put("zeroshot", label, {"tasks": tasks, "mean": zs["mean"], "limit": args.zeroshot_limit,
                                    "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"zero-shot {label:28s} mean {zs['mean']:.3f} {tasks}", flush=True)


# ---- speed ----------------------------------------------------------------------------------------
def speed(res: Results, args) -> None:
    models = {"dense": None}
    for name in ("depth-ppl-6", "search-wanda-sp-0.3-seed0", "uniform-wanda-sp-0.3"):
        if (WORK / name).is_dir():
            models[name] = WORK / name
    loaded = {
        k: (load() if f is None else lp.load(str(f), device="cpu", quiet=True)) for k, f in models.items()
    }
    ids = lp.calibration(loaded["dense"], HELDOUT, samples=1, seqlen=HELDOUT_SEQLEN).input_ids
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in loaded}
    with torch.no_grad():
        for _ in range(args.speed_repeats):  # interleaved: each round times every model once
            for k, lm in loaded.items():
                t0 = time.perf_counter()
                lm.model(ids)
                times[k]["prefill"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                lm.model.generate(ids[:, :16], max_new_tokens=128, min_new_tokens=128, do_sample=False)
                times[k]["decode"].append(time.perf_counter() - t0)
    dense = {m: statistics.median(times["dense"][m]) for m in ("prefill", "decode")}
    for k, t in times.items():
        med = {m: statistics.median(v) for m, v in t.items()}
        res.put("speed", k, {
            "prefill_1x512_seconds": med["prefill"], "decode_128_seconds": med["decode"],
            "prefill_speedup": dense["prefill"] / med["prefill"], "decode_speedup": dense["decode"] / med["decode"],
            "parameters": sum(p.numel() for p in loaded[k].model.parameters()), "runs": t,
        })  # fmt: skip
        print(f"speed {k:28s} prefill x{dense['prefill'] / med['prefill']:.2f} decode x{dense['decode'] / med['decode']:.2f}", flush=True)  # fmt: skip


# ---- cost and figures -----------------------------------------------------------------------------
def cost(res: Results, args) -> None:
    rows = []
    for section in ("depth", "sparsity", "width"):
        for key, r in res.doc.get(section, {}).items():
            if "forwards" in r and "estimate_forwards" in r:
                est = r["estimate_forwards"]
                rows.append({"stage": f"{section}:{key}", "forwards": r["forwards"], "estimate": est,
                             "ratio": r["forwards"] / est if est else None})  # fmt: skip
    res.doc["cost"] = {r["stage"]: r for r in rows}
    d, s, w = res.doc.get("depth", {}), res.doc.get("sparsity", {}), res.doc.get("width", {})
    fig: dict = {}
    if all(k in s for k in ("alpha-wanda-0.7", "uniform-wanda-0.7")):
        fig["a_alpha_over_uniform_wanda_70"] = (
            s["alpha-wanda-0.7"]["heldout_ppl"] / s["uniform-wanda-0.7"]["heldout_ppl"]
        )
        fig["a_best_eps_over_uniform"] = min(
            r["heldout_ppl"] for r in s.values() if r["pruner"] == "wanda" and r["allocation"] == "alpha" and r["target"] == 0.7
        ) / s["uniform-wanda-0.7"]["heldout_ppl"]  # fmt: skip
    good = [d[f"{m}-6"]["heldout_ppl"] for m in ("ppl", "sleb", "shapley") if f"{m}-6" in d]
    bad = [d[f"{m}-6"]["heldout_ppl"] for m in ("bi", "angular") if f"{m}-6" in d]
    if good and bad:
        fig["b_best_ppl_sleb_shapley_over_worse_bi_angular_6"] = min(good) / max(bad)
    for pruner in ("wanda-sp", "magnitude-sp"):
        searched = [
            r["heldout_ppl"]
            for k, r in w.items()
            if k.startswith(f"search-{pruner}-0.3") and "heldout_ppl" in r
        ]
        base = {a: w.get(f"{a}-{pruner}-0.3", {}).get("heldout_ppl") for a in ("uniform", "owl")}
        if searched and all(base.values()):
            fig[f"c_{pruner}_30_searched_median_over_uniform"] = statistics.median(searched) / base["uniform"]
            fig[f"c_{pruner}_30_searched_median_over_owl"] = statistics.median(searched) / base["owl"]
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    if ratios:
        fig["d_worst_forwards_over_estimate"] = max(ratios)
        fig["d_worst_stage"] = max(rows, key=lambda r: r["ratio"] or 0)["stage"]
    res.doc["figures"] = fig
    write(res.doc, res.path)
    print(json.dumps(fig, indent=2))


def report(res: Results, args) -> None:
    folders = [WORK / n for n in ("depth-ppl-6", "depth-ppl-6+lora", "alpha-wanda-70", "search-wanda-sp-0.3-seed0",
                                  "uniform-wanda-sp-0.3") if (WORK / n).is_dir()]  # fmt: skip
    evals = WORK / "evals"
    evals.mkdir(parents=True, exist_ok=True)
    from layerprune.evaluation import results_document

    for f in [None, *folders]:
        lm = load() if f is None else lp.load(str(f), device="cpu", quiet=True)
        ppl = lp.perplexity(
            lm, HELDOUT, seqlen=HELDOUT_SEQLEN, max_windows=args.heldout_windows, progress=False
        )
        label = "dense" if f is None else f.name
        zs = res.doc.get("zeroshot", {}).get(label)
        doc = results_document(lm, MODEL if f is None else str(f), [ppl.to_dict()], None)
        if zs:
            doc["zeroshot_summary"] = zs
        (evals / f"{label}.json").write_text(json.dumps(doc, indent=2, default=str))
    lp.report([*folders, evals], HERE / "results" / "real_report", overwrite=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "real.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--fresh", action="store_true", help="recompute the sections named")
    ap.add_argument("--heldout-windows", type=int, default=8, help="windows of 512 tokens of fixture:test")
    ap.add_argument("--recover-steps", type=int, default=20)
    ap.add_argument("--zeroshot-limit", type=int, default=50)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument(
        "--smoke", action="store_true", help="every section on the fixture at toy sizes (-o elsewhere)"
    )
    args = ap.parse_args(argv)
    if args.smoke:  # a quick check that every section runs, not a measurement
        global MODEL, HELDOUT_SEQLEN, SHAPLEY_BUDGET, WORK, REMOVE
        MODEL, HELDOUT_SEQLEN, SHAPLEY_BUDGET, WORK = "fixture", 128, 16, HERE / "work" / "real-smoke"
        REMOVE = (2, 4)
        SIZES.update(depth=(4, 64), sparsity=(4, 64), fitness=(2, 32))
        SEARCH.update(population=4, iterations=1, crossovers=1, mutations=1)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; use {','.join(SECTIONS)}")
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    res = Results(args.output, sections if args.fresh else ())
    if args.report:
        return report(res, args)
    if "protocol" not in res.doc:
        protocol(res, args)
    for s in sections:
        t0 = time.perf_counter()
        globals()[s](res, args)
        print(f"[{s}] {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
