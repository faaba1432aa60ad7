"""Serving what we prune, in llama.cpp, on the real model (SmolLM2-135M-Instruct, fp32).

    python bench/serve.py [--setup] [--only ROW,...] [--fresh ROW,...] [--rounds 5] [--threads 2]

1. llama.cpp's CPU runtime, built once from the llama-cpp-python source distribution (which vendors
   llama.cpp and its converter) into $LAYERPRUNE_CACHE/llama.cpp/<version>/ by
   layerprune.models.llamacpp_tools (`make llamacpp`): the `llama` library and its tools. `--setup`
   stops there. The Python bindings of
   the same sdist are loaded against that library (LLAMA_CPP_LIB_PATH), for logits.
2. Plans on SmolLM2 (structured scores: Wanda-sp on 16 x 512 tokens of fixture:val; the searches'
   fitness: 10 x 128 tokens of the same text, default search, evaluation stores under
   bench/work/serve/ so that a rerun resumes), at 20 % and 30 % of the blocks' parameters:
   - depth: Shortened LLaMA's ppl criterion, the blocks nearest the width's parameter count;
   - width, unrestricted (uniform, OWL, search): KV groups and channels, layerprune's per-block format;
   - width, deployable (`--deploy decilm`: uniform, OWL, search), DeciLM checkpoints.
   Held-out perplexity (layerprune, fixture:test, the first 64 windows of 512 tokens) for each, and
   deployable / unrestricted at the same allocation and target.
3. Every servable model (dense, depth, uniform width, deployable) converted by llama.cpp's converter
   (f32), llama.cpp's next-token logits against layerprune's on 8 x 256 held-out tokens (f32 KV
   cache: top-1 agreement, max |difference| of log-probabilities), and speed in llama-bench
   (prompt processing of 128 tokens, generation of 64; default f16 KV cache), `--rounds` interleaved
   rounds of every model, pruned / dense per round, medians.

Written to bench/results/serve.json after every row; rows already there are kept unless --fresh.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.models.llamacpp import to_gguf  # noqa: E402
from layerprune.models.llamacpp_tools import VERSION, build, find_tools  # noqa: E402
from layerprune.models.llamacpp_tools import bindings as llamacpp_bindings  # noqa: E402

RESULTS = HERE / "results" / "serve.json"
WORK = HERE / "work" / "serve"
CALIB, HELDOUT = "fixture:val", "fixture:test"
WIDTHS = (0.3, 0.2)
HELDOUT_WINDOWS = 64
AGREEMENT = (8, 256)  # windows x tokens


# ---- 1. llama.cpp -------------------------------------------------------------------------------------
def setup(log=print) -> Path:
    """The cached llama.cpp build (layerprune.models.llamacpp_tools, what `make llamacpp` runs): its
    folder (src/ = the unpacked sdist, build/bin/ = binaries)."""
    tools = build(log=log)
    return tools.bin.parent.parent


def bindings(root: Path):
    """llama.cpp's Python bindings (the sdist's pure-Python package) on the library built here."""
    return llamacpp_bindings(find_tools())


# ---- 2. plans and models -------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path, fresh: set[str]):
        self.path = path
        self.doc = json.loads(path.read_text()) if path.exists() else {}
        self.doc["benchmark"] = "pruned SmolLM2-135M-Instruct served by llama.cpp (CPU)"
        for section in ("models", "served"):
            for key in list(self.doc.get(section, {})):
                if key in fresh:
                    del self.doc[section][key]

    def get(self, section, key):
        return self.doc.get(section, {}).get(key)

    def put(self, section, key, row):
        self.doc.setdefault(section, {})[key] = row
        write(self.doc, self.path)
        return row


def rows() -> list[tuple[str, dict]]:
    """(id, how) for every model: kind depth / width, allocation, deploy, target."""
    out = []
    for w in WIDTHS:
        pct = round(w * 100)
        out.append((f"depth-{pct}", {"kind": "depth", "target": w}))
        for allocation in ("uniform", "owl", "search"):
            out.append((f"{allocation}-{pct}", {"kind": "width", "allocation": allocation, "target": w}))
            out.append((f"deploy-{allocation}-{pct}", {"kind": "width", "allocation": allocation, "target": w,
                                                        "deploy": "decilm"}))  # fmt: skip
    return out


def make_model(key: str, how: dict, dense, calib, depth_scores) -> tuple[Path, dict]:
    """Plan, apply and export one row's model into WORK/key (kept: a rerun reuses it)."""
    folder = WORK / key
    if (folder / "report.json").is_file():
        return folder, json.loads((folder / "report.json").read_text())
    lm = lp.load(dense, quiet=True)
    t0 = time.perf_counter()
    if how["kind"] == "depth":
        per_block = sum(p.numel() for p in lm.adapter.blocks[0].parameters())
        count = round(how["target"] * sum(p.numel() for p in lm.adapter.blocks.parameters()) / per_block)
        plan = lp.plan(lm, depth_scores, remove=count)
    else:
        options = {"allocation": how["allocation"]}
        if how.get("deploy"):
            options["deploy"] = how["deploy"]
        if how["allocation"] == "search":
            options["store"] = str(WORK / f"{key}.store.db")
            options["log"] = str(WORK / f"{key}.search.jsonl")
        plan = lp.plan(lm, width=how["target"], calib=calib, progress=False, **options)
    plan_seconds = time.perf_counter() - t0
    report = lp.apply(lm, plan, None if how["kind"] == "depth" else calib, progress=False)
    lp.export(lm, folder, plan, {"pruning": report, "plan_seconds": plan_seconds}, overwrite=True)
    return folder, json.loads((folder / "report.json").read_text())


def quality(folder: Path) -> dict:
    lm = lp.load(str(folder), quiet=True)
    r = lp.perplexity(lm, HELDOUT, seqlen=512, max_windows=HELDOUT_WINDOWS, progress=False)
    return {
        "heldout_ppl": r.ppl,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "format": json.loads((folder / "config.json").read_text()).get("model_type"),
    }


# ---- 3. llama.cpp: conversion, agreement, speed ------------------------------------------------------------
def convert(folder: Path, root: Path) -> Path:
    out = WORK / "gguf" / f"{folder.name}.f32.gguf"
    if not out.is_file():
        to_gguf(folder, out, outtype="f32", converter=root / "src" / "vendor" / "llama.cpp")
    return out


def agreement(llama_cpp, gguf: Path, folder: Path) -> dict:
    """llama.cpp's next-token distribution against layerprune's on held-out windows."""
    import numpy as np
    import torch

    lm = lp.load(str(folder), quiet=True)
    n, seqlen = AGREEMENT
    windows = lp.calibration(lm, HELDOUT, samples=n, seqlen=seqlen, kind="sparsity")
    f32 = 0  # GGML_TYPE_F32: the KV cache in f32, so that only the engines' arithmetic differs
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=seqlen, n_batch=seqlen, logits_all=True, n_threads=2,
                          type_k=f32, type_v=f32, verbose=False)  # fmt: skip
    same = total = 0
    worst = 0.0
    try:
        for row in windows.input_ids:
            tokens = row.tolist()
            llm.reset()
            llm.eval(tokens)
            a = np.array(llm.scores[: len(tokens)], dtype=np.float64)
            with torch.no_grad():
                b = lm.model(row[None]).logits[0].double().numpy()
            la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
            lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += len(tokens)
            worst = max(worst, float(np.abs(la - lb).max()))
    finally:
        llm.close()
    return {"tokens": total, "top1_agreement": same / total, "max_abs_logprob_difference": worst,
            "windows": windows.protocol}  # fmt: skip


def bench_once(root: Path, gguf: Path, threads: int) -> dict:
    exe = root / "build" / "bin" / "llama-bench"
    r = subprocess.run([str(exe), "-m", str(gguf), "-t", str(threads), "-p", "128", "-n", "64", "-r", "3", "-o",
                        "json"], capture_output=True, text=True, check=True)  # fmt: skip
    out = {}
    for rec in json.loads(r.stdout):
        out["pp128" if rec["n_prompt"] else "tg64"] = rec["avg_ts"]
    return out


def speed(root: Path, models: dict[str, Path], rounds: int, threads: int) -> dict:
    """Tokens/s in llama-bench, `rounds` interleaved rounds of every model; ratios to dense per round."""
    per = {k: [] for k in models}
    for _ in range(rounds):
        for key, gguf in models.items():
            per[key].append(bench_once(root, gguf, threads))
    out = {}
    for key, runs in per.items():
        row = {"runs": runs}
        for metric in ("pp128", "tg64"):
            row[f"{metric}_tokens_per_s"] = statistics.median(r[metric] for r in runs)
            row[f"{metric}_vs_dense"] = statistics.median(
                r[metric] / d[metric] for r, d in zip(runs, per["dense"])
            )
        out[key] = row
    return out


def markdown(doc: dict) -> str:
    """The README's table from serve.json."""
    models, served = doc.get("models", {}), doc.get("served", {})
    dense = models.get("dense", {})
    out = ["| model | parameters | held-out ppl | deployable / unrestricted ppl | llama.cpp | top-1 agreement | "
           "max Δ log-prob | prompt tok/s (× dense) | generation tok/s (× dense) |", "|---" * 9 + "|"]  # fmt: skip
    for key, m in models.items():
        s = served.get(key, {})
        cmp = doc.get("deployable_vs_unrestricted", {}).get(key)
        sp = s.get("speed", {})
        cells = [
            key, f"{m['parameters'] / 1e6:.1f} M ({m['parameters'] / dense['parameters']:.3f})", f"{m['heldout_ppl']:.2f}",
            f"{cmp['ppl_ratio']:.3f}" if cmp else "",
            "refused" if "refused" in s else ("✓" if s else "— (layerprune's per-block format)"),
            f"{s['top1_agreement']:.4f}" if "top1_agreement" in s else "",
            f"{s['max_abs_logprob_difference']:.1e}" if "top1_agreement" in s else "",
            f"{sp['pp128_tokens_per_s']:.0f} ({sp['pp128_vs_dense']:.2f})" if sp else "",
            f"{sp['tg64_tokens_per_s']:.1f} ({sp['tg64_vs_dense']:.2f})" if sp else "",
        ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="build llama.cpp into the cache and stop")
    p.add_argument("--only", default=None, help="comma-separated row ids")
    p.add_argument("--fresh", default="", help="comma-separated row ids to measure again")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="skip llama-bench")
    p.add_argument(
        "--markdown", action="store_true", help="print the README's table from the results and stop"
    )
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.output.read_text())))
        return 0
    root = setup()
    if args.setup:
        print(f"llama.cpp {VERSION} built in {root}")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    res = Results(args.output, set(filter(None, args.fresh.split(","))))
    dense = str(lp.load("smollm2", quiet=True).path)
    wanted = set(args.only.split(",")) if args.only else None
    lm = lp.load(dense, quiet=True)
    calib = lp.calibration(lm, CALIB, samples=16, seqlen=512)
    depth_calib = lp.calibration(lm, CALIB, samples=10, seqlen=128, kind="depth")
    res.doc["protocol"] = {
        "structured_calibration": calib.protocol, "depth_calibration": depth_calib.protocol,
        "heldout": {"dataset": HELDOUT, "seqlen": 512, "windows": HELDOUT_WINDOWS},
        "agreement": {"windows": AGREEMENT[0], "seqlen": AGREEMENT[1], "kv_cache": "f32"},
        "speed": {"tool": "llama-bench", "prompt": 128, "generate": 64, "repetitions": 3, "threads": args.threads,
                  "rounds": args.rounds, "gguf": "f32", "kv_cache": "f16 (default)"},
        "llama_cpp": VERSION,
    }  # fmt: skip
    depth_scores = None
    folders = {"dense": Path(dense)}
    if res.get("models", "dense") is None:
        res.put("models", "dense", quality(Path(dense)))
    for key, how in rows():
        if wanted is not None and key not in wanted:
            continue
        if how["kind"] == "depth" and depth_scores is None:
            depth_scores = lp.score(lm, "ppl", depth_calib, progress=False)
        folder, report = make_model(key, how, dense, calib, depth_scores)
        folders[key] = folder
        if res.get("models", key) is None:
            row = {**how, **quality(folder), "plan_seconds": report.get("plan_seconds")}
            plan = report.get("plan") or {}
            row["achieved"] = (plan.get("params") or {}).get("achieved")
            res.put("models", key, row)
    # deployable against unrestricted, same allocation and target
    cmp = {}
    for key, row in res.doc.get("models", {}).items():
        if key.startswith("deploy-"):
            base = res.get("models", key.removeprefix("deploy-"))
            if base:
                cmp[key] = {"ppl_ratio": row["heldout_ppl"] / base["heldout_ppl"],
                            "parameters_ratio": row["parameters"] / base["parameters"]}  # fmt: skip
    res.doc["deployable_vs_unrestricted"] = cmp
    write(res.doc, args.output)
    llama_cpp = bindings(root)
    ggufs = {}
    for key, folder in folders.items():  # the per-block layerprune format is refused: recorded as such
        try:
            ggufs[key] = convert(folder, root)
        except lp.LayerpruneError as e:
            res.put("served", key, {"refused": str(e)})
            continue
        if res.get("served", key) is None:
            res.put(
                "served",
                key,
                {"gguf_bytes": ggufs[key].stat().st_size, **agreement(llama_cpp, ggufs[key], folder)},
            )
    if not args.no_speed:
        for key, row in speed(root, ggufs, args.rounds, args.threads).items():
            res.put("served", key, {**res.get("served", key), "speed": row})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
