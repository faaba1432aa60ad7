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
from layerprune.checkpoint import read_record  # noqa: E402
from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.evaluation.perplexity import perplexity_of_windows  # noqa: E402

MODEL = "smollm2"
CALIB, TRAIN, HELDOUT = "fixture:val", "fixture:train", "fixture:test"
SECTIONS = ("depth", "sparsity", "width", "recovery", "zeroshot", "speed", "cost", "figures")
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
    stores = {
        "shapley": str(WORK / "shapley.sqlite")
    }  # a rerun (e.g. after a surrogate change) re-evaluates nothing
    for method in DEPTH_METHODS:
        if all(res.has("depth", f"{method}-{k}") for k in REMOVE):
            continue
        lm = load()
        t0 = time.perf_counter()
        store = {"store": stores[method]} if method in stores else {}
        scores = lp.score(lm, method, calib, progress=not args.quiet, **options.get(method, {}), **store)
        seconds = time.perf_counter() - t0
        scores.save(WORK / f"depth-{method}.json")
        calls = scores.extra.get("block_calls") if scores.extra else None
        estimate = calls / (L * batches) if calls else {"taylor": 3.0, "bi": 1.0, "angular": 1.0}.get(method)
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
    # SparseGPT (about 4x Wanda's time here) at 50 % and 70 % only, to fit the CPU budget
    configs = [(t, a, p, None, None) for t in TARGETS for a in ("uniform", "owl", "alpha") for p in ("magnitude", "wanda", "sparsegpt")
               if p != "sparsegpt" or t in (0.5, 0.7)]  # fmt: skip
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
    # searches: 3 seeds at 30 %, one at 20 %, with wanda-sp (the Self-Pruner base pruner)
    runs += [(0.3, "search", "wanda-sp", s) for s in (0, 1, 2)] + [(0.2, "search", "wanda-sp", 0)]
    runs = [(w, "flap", "flap", None) for w in WIDTHS] + runs
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
                       forwards=plan_seconds / fit_unit, estimate_forwards=float(ev))  # fmt: skip
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
                plan, _ = read_record(WORK / name)  # the pruned model's plan: the report shows what was cut
                lp.export(lm, WORK / f"{name}+lora", plan, {"recovery": record}, overwrite=True)


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


# ---- cost ------------------------------------------------------------------------------------------
class Units:
    """The cost unit of a group of stages: one dense forward over the group's windows, timed before the
    group and again after it (their mean), so that load on the machine affects unit and stages alike."""

    def __init__(self, lm, windows):
        self.lm, self.windows, self.before = lm, windows, forward_seconds(lm, windows)
        self.rows: list[tuple[str, float, float, dict]] = []

    def time(self, stage: str, run, estimate: float, **extra):
        t0 = time.perf_counter()
        out = run()
        self.rows.append((stage, time.perf_counter() - t0, estimate, extra))
        return out

    def close(self, res: Results) -> None:
        unit = (self.before + forward_seconds(self.lm, self.windows)) / 2
        for stage, seconds, estimate, extra in self.rows:
            seconds = seconds / extra.pop("per", 1)
            row = {"seconds": seconds, "unit_seconds": unit, "forwards": seconds / unit, "estimate": estimate,
                   "ratio": seconds / unit / estimate if estimate else None, **extra}  # fmt: skip
            res.put("cost", stage, row)
            print(f"cost {stage:28s} {seconds:7.1f}s = {row['forwards']:6.2f} forwards (estimate {estimate:.2f})", flush=True)  # fmt: skip


def cost(res: Results, args) -> None:
    """Each stage's wall time in dense forwards over its own data, against the forwards it needs.

    Estimates: ppl = the mask engine's block forwards / (blocks x micro-batches) (sleb and shapley run
    the same engine; their counts are in the depth rows); taylor 3 (forward + backward); bi, angular,
    owl, wanda-sp, flap 1 (one pass collecting statistics); wanda, sparsegpt 2 (each block's statistics,
    then its pruned outputs: the sequential procedure); magnitude 0 (weights only: reported in
    seconds); width search = evaluations x one forward over its fitness windows (candidates are
    evaluated as masks on the full-size model, no copies); LoRA 2 (forward, and a backward through
    frozen weights) and full training 3 per token; held-out perplexity 1."""
    lm = load()
    L = lm.adapter.num_blocks
    depth_w = lp.calibration(lm, CALIB, samples=SIZES["depth"][0], seqlen=SIZES["depth"][1])
    sparse_w = lp.calibration(
        lm, CALIB, samples=SIZES["sparsity"][0], seqlen=SIZES["sparsity"][1], kind="sparsity"
    )
    fit_w = lp.calibration(lm, CALIB, samples=SIZES["fitness"][0], seqlen=SIZES["fitness"][1])
    batches = math.ceil(depth_w.input_ids.shape[0] / 16)

    u = Units(lm, depth_w)
    for method in ("ppl", "taylor", "bi", "angular"):
        s = u.time(f"score-{method}", lambda m=method: lp.score(lm, m, depth_w, progress=False), 0.0)
        calls = (s.extra or {}).get("block_calls")
        est = calls / (L * batches) if calls else {"taylor": 3.0, "bi": 1.0, "angular": 1.0}[method]
        u.rows[-1] = (*u.rows[-1][:2], est, u.rows[-1][3])
    u.close(res)

    u = Units(lm, sparse_w)
    for method in ("owl", "wanda-sp", "flap"):
        kw = {"unit": "module"} if method != "owl" else {}
        u.time(f"score-{method}", lambda m=method, k=kw: lp.score(lm, m, sparse_w, progress=False, **k), 1.0)
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        m = load()
        calib = None if pruner == "magnitude" else sparse_w
        plan = lp.plan(m, sparsity=0.5, pruner=pruner, calib=calib, progress=False)
        u.time(f"apply-{pruner}-0.5", lambda m=m, p=plan, c=calib: lp.apply(m, p, c, progress=False),
               0.0 if pruner == "magnitude" else 2.0)  # fmt: skip
    wsp = lp.score(lm, "wanda-sp", sparse_w, unit="module", progress=False)
    u.close(res)

    u = Units(lm, fit_w)
    plan = u.time("plan-search-wanda-sp-0.3", lambda: lp.plan(
        lm, width=0.3, scores=wsp, calib=sparse_w, allocation="search", population=6, iterations=2, crossovers=2,
        mutations=2, fitness_samples=SIZES["fitness"][0], fitness_seqlen=SIZES["fitness"][1], progress=False), 0.0)  # fmt: skip
    ev = plan.extra["evaluations_this_run"]
    u.rows[-1] = (*u.rows[-1][:2], float(ev), {"evaluations": ev})
    u.close(res)

    steps, batch = 4, 4
    u = Units(lm, lp.Windows(lp.calibration(lm, TRAIN, samples=batch, seqlen=128).input_ids, {}))
    for method in ("lora", "full"):
        m = load()
        u.time(f"recover-{method}", lambda m=m, mm=method: lp.recover(m, TRAIN, method=mm, seqlen=128, steps=steps,
               batch_size=batch, warmup=0, progress=False), 2.0 if method == "lora" else 3.0,
               per=steps, note="per step of 4 x 128 tokens")  # fmt: skip
    u.close(res)

    ev_w = lp.eval_windows(lm.tokenizer, lp.load_text(HELDOUT), HELDOUT_SEQLEN, "none", args.heldout_windows)
    u = Units(lm, ev_w)
    u.time("eval-heldout", lambda: heldout(lm, args.heldout_windows), 1.0)
    u.close(res)


def figures(res: Results, args) -> None:
    d, s, w = res.doc.get("depth", {}), res.doc.get("sparsity", {}), res.doc.get("width", {})
    fig: dict = {}
    if all(k in s for k in ("alpha-wanda-0.7", "uniform-wanda-0.7")):
        fig["a_alpha_over_uniform_wanda_70"] = (
            s["alpha-wanda-0.7"]["heldout_ppl"] / s["uniform-wanda-0.7"]["heldout_ppl"]
        )
        fig["a_best_eps_over_uniform"] = min(
            r["heldout_ppl"] for r in s.values() if r["pruner"] == "wanda" and r["allocation"] == "alpha" and r["target"] == 0.7
        ) / s["uniform-wanda-0.7"]["heldout_ppl"]  # fmt: skip
    good = {m: d[f"{m}-6"]["heldout_ppl"] for m in ("ppl", "sleb", "shapley") if f"{m}-6" in d}
    bad = {m: d[f"{m}-6"]["heldout_ppl"] for m in ("bi", "angular") if f"{m}-6" in d}
    if good and bad:
        fig["b_best_ppl_sleb_shapley_over_worse_bi_angular_6"] = min(good.values()) / max(bad.values())
        fig["b_best_ppl_sleb_shapley_over_better_bi_angular_6"] = min(good.values()) / min(bad.values())
    for pruner in ("wanda-sp", "magnitude-sp"):
        searched = [
            r["heldout_ppl"]
            for k, r in w.items()
            if k.startswith(f"search-{pruner}-0.3") and "heldout_ppl" in r
        ]
        base = {a: w.get(f"{a}-{pruner}-0.3", {}).get("heldout_ppl") for a in ("uniform", "owl")}
        if searched and all(base.values()):
            fig[f"c_{pruner}_30_searched_worst_over_uniform"] = max(searched) / base["uniform"]
            fig[f"c_{pruner}_30_searched_worst_over_owl"] = max(searched) / base["owl"]
    c = res.doc.get("cost", {})
    if "plan-search-wanda-sp-0.3" in c and "score-owl" in c:
        # the search seeds its population with OWL rates: one OWL pass over the structured calibration
        # (16 x 512 tokens), counted apart from the evaluations it makes over its fitness windows
        r = c["plan-search-wanda-sp-0.3"]
        rest = (r["seconds"] - c["score-owl"]["seconds"]) / r["unit_seconds"]
        fig["d_search_without_owl_seeding_forwards_over_evaluations"] = rest / r["estimate"]
    rows = {k: r for k, r in c.items() if r.get("ratio") is not None}
    if rows:
        worst = max(rows, key=lambda k: rows[k]["ratio"])
        fig["d_worst_forwards_over_estimate"] = rows[worst]["ratio"]
        fig["d_worst_stage"] = worst
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
        if zs:  # the zero-shot section's accuracies, in the shape `layerprune eval -o` writes
            zs = {"tasks": {t: {"metric": "acc", "acc": v, "samples": zs["limit"]} for t, v in zs["tasks"].items()},
                  "mean": zs["mean"], "limit": zs["limit"]}  # fmt: skip
        doc = results_document(lm, MODEL if f is None else str(f), [ppl.to_dict()], zs)
        (evals / f"{label}.json").write_text(json.dumps(doc, indent=2, default=str))
    lp.report([*folders, evals], HERE / "results" / "real_report", overwrite=True,
              title="SmolLM2-135M-Instruct pruned by layerprune (bench/real.py): calibration fixture:val, "
              "training fixture:train, held-out fixture:test")  # fmt: skip


def markdown(res: Results) -> str:
    """The README's tables, from real.json."""
    d = res.doc
    out = [f"Dense held-out perplexity {d['dense']['heldout_ppl']:.2f} ({d['protocol']['heldout']['tokens']:,} tokens of "
           f"{HELDOUT} at seqlen {d['protocol']['heldout']['seqlen']}).", ""]  # fmt: skip

    def fmt(v):
        return "–" if v is None else (f"{v:.1f}" if v >= 100 else f"{v:.2f}")

    if "depth" in d:
        out += ["| depth: blocks removed of 30 | " + " | ".join(DEPTH_METHODS) + " |",
                "|---|" + "---|" * len(DEPTH_METHODS)]  # fmt: skip
        for k in REMOVE:
            out.append(f"| {k} | " + " | ".join(fmt(d["depth"].get(f"{m}-{k}", {}).get("heldout_ppl")) for m in DEPTH_METHODS) + " |")  # fmt: skip
        out.append("| scorer seconds | " + " | ".join(f"{d['depth'][f'{m}-3']['scorer_seconds']:.0f}" if f"{m}-3" in d["depth"] else "–" for m in DEPTH_METHODS) + " |")  # fmt: skip
        out.append("")
    if "sparsity" in d:
        sp = d["sparsity"]
        out += ["| sparsity | " + " | ".join(f"{p} {a}" for p in ("magnitude", "wanda", "sparsegpt") for a in ("uniform", "owl", "alpha")) + " |",
                "|---|" + "---|" * 9]  # fmt: skip
        for t in (*TARGETS, "2:4"):
            cells = []
            for p in ("magnitude", "wanda", "sparsegpt"):
                for a in ("uniform", "owl", "alpha"):
                    cells.append(fmt(sp.get(f"{a}-{p}-{t}", {}).get("heldout_ppl")))
            out.append(f"| {t if t == '2:4' else f'{t:.0%}'} | " + " | ".join(cells) + " |")
        eps = {0.2: sp.get("alpha-wanda-0.7", {}).get("heldout_ppl")}
        eps.update(
            {e: sp.get(f"alpha-wanda-0.7-eps{e}", {}).get("heldout_ppl") for e in EPSILONS if e != 0.2}
        )
        out += [
            "",
            "AlphaPruning ε at 70 % Wanda: " + ", ".join(f"ε {e} → {fmt(eps[e])}" for e in sorted(eps)),
            "",
        ]
    if "width" in d:
        w = d["width"]
        out += [
            "| width | uniform | owl | alpha | search (seeds 0-2 at 30 %, 0 at 20 %) | FLAP (AL-AM, bias compensation) |",
            "|---|---|---|---|---|---|",
        ]
        for t in WIDTHS:
            for p in ("wanda-sp", "magnitude-sp"):
                seeds = [
                    w[k]["heldout_ppl"]
                    for k in sorted(w)
                    if k.startswith(f"search-{p}-{t}-") and "heldout_ppl" in w[k]
                ]
                flap = fmt(w.get(f"flap-flap-{t}", {}).get("heldout_ppl")) if p == "wanda-sp" else ""
                out.append(f"| {t:.0%} {p} | " + " | ".join(fmt(w.get(f"{a}-{p}-{t}", {}).get("heldout_ppl")) for a in ("uniform", "owl", "alpha"))
                           + f" | {', '.join(fmt(v) for v in seeds) or '–'} | {flap} |")  # fmt: skip
        out.append("")
    if "recovery" in d:
        out += ["| recovery (same tokens) | before | LoRA | CPT (full) |", "|---|---|---|---|"]
        for name in ("depth-ppl-6", "alpha-wanda-70"):
            lo, fu = d["recovery"].get(f"{name}-lora", {}), d["recovery"].get(f"{name}-full", {})
            out.append(f"| {name} ({lo.get('tokens', 0):,} tokens) | {fmt(lo.get('heldout_before'))} | {fmt(lo.get('heldout_after'))} | {fmt(fu.get('heldout_after'))} |")  # fmt: skip
        out.append("")
    if "zeroshot" in d:
        out += [
            "| zero-shot (bundled tasks) | "
            + " | ".join(next(iter(d["zeroshot"].values()))["tasks"])
            + " | mean |",
            "|---|---|---|---|---|",
        ]
        for k, r in d["zeroshot"].items():
            out.append(
                f"| {k} | " + " | ".join(f"{v:.3f}" for v in r["tasks"].values()) + f" | {r['mean']:.3f} |"
            )
        out.append("")
    if "speed" in d:
        out += [
            "| speed (median of interleaved runs) | parameters | prefill 1×512 s | decode 128 s | prefill speed-up | decode speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for k, r in d["speed"].items():
            out.append(f"| {k} | {r['parameters'] / 1e6:.1f}M | {r['prefill_1x512_seconds']:.2f} | {r['decode_128_seconds']:.2f} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, default=HERE / "results" / "real.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--fresh", action="store_true", help="recompute the sections named")
    ap.add_argument("--heldout-windows", type=int, default=8, help="windows of 512 tokens of fixture:test")
    ap.add_argument("--recover-steps", type=int, default=20)
    ap.add_argument("--zeroshot-limit", type=int, default=30)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the README tables from the results")
    ap.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="fold the sections of other result files in"
    )
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
    for other in args.merge:  # sections measured by another process (e.g. width on the second core)
        for section, rows in json.loads(other.read_text()).items():
            if section in SECTIONS and isinstance(rows, dict):
                res.doc.setdefault(section, {}).update(rows)
        write(res.doc, res.path)
    if args.report:
        return report(res, args)
    if args.markdown:
        return print(markdown(res))
    if "protocol" not in res.doc:
        protocol(res, args)
    res.doc["protocol"].setdefault("threads_by_section", {}).update(
        {s: torch.get_num_threads() for s in sections}
    )
    for s in sections:
        t0 = time.perf_counter()
        globals()[s](res, args)
        print(f"[{s}] {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
