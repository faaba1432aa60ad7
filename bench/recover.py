"""Recovery and zero-shot accuracy on the bundled model (issue: recovery, lm-eval, report), and
recovery by distillation against LoRA and CPT on SmolLM2 (issue 34: `--model smollm2`, _recover_kd.py).

    python bench/recover.py [-o bench/results/recover.json] [--steps 200]
    python bench/recover.py --model smollm2 [-o bench/results/recover_kd.json] [--steps 20]
    python bench/recover.py --model smollm2 --markdown     # the tables of recover_kd.json

The fixture mode (the default):

1. Two pruned fixtures: 3 of 12 blocks removed by the ppl criterion (10 x 128 tokens of fixture:val)
   and 70% Wanda sparsity (uniform; 128 x 256 tokens of fixture:val).
2. Each recovered on fixture:train (a slice of the training split; never the held-out text) with the
   same budget, `steps` x 8 windows x 128 tokens: LoRA at the Shortened LLaMA defaults (rank 8,
   alpha 16, lr 1e-4) and full training (CPT) at lr 1e-4; each run in a fresh
   process (bench/_recover_run.py) whose peak RSS during training is read from /proc.
3. Held-out perplexity (all of fixture:test, seqlen 128) before and after; zero-shot accuracy (the
   bundled offline lm-eval tasks, full) of the dense, pruned and recovered models, with stderr.
4. A side-by-side report of every model (bench/results/recover_report/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _results import write

import layerprune as lp
from layerprune.evaluation import results_document
from layerprune.evaluation.zeroshot import zeroshot
from layerprune.io import atomic_write_json

HERE = Path(__file__).resolve().parent
RUNS = [("lora", 1e-4), ("full", 1e-4)]


def prepare(work: Path) -> dict[str, Path]:
    """The two pruned models (kept in `work` between runs of this script: delete it to redo them)."""
    if (work / "depth3" / "report.json").exists() and (work / "wanda70" / "report.json").exists():
        return {"depth3": work / "depth3", "wanda70": work / "wanda70"}
    models = {}
    lm = lp.load("fixture", device="cpu", quiet=True)
    scores = lp.score(lm, "ppl", lp.calibration(lm), progress=False)
    depth = lp.plan(lm, scores, remove=3)
    counts = lp.apply(lm, depth)
    models["depth3"] = lp.export(lm, work / "depth3", depth, {"pruning": counts}, overwrite=True)
    lm = lp.load("fixture", device="cpu", quiet=True)
    sparse = lp.plan(lm, sparsity=0.7, pruner="wanda", progress=False)
    counts = lp.apply(lm, sparse, progress=False)
    models["wanda70"] = lp.export(lm, work / "wanda70", sparse, {"pruning": counts}, overwrite=True)
    print(
        f"pruned: depth3 removes {depth.remove}; wanda70 mean sparsity {counts['achieved_mean_sparsity']:.3f}"
    )
    return models


def recover_run(model: Path, method: str, lr: float, out: Path, steps: int) -> dict:
    """One run in a fresh process; its result is kept next to its output (delete both to redo it)."""
    kept = out.with_name(out.name + ".json")
    if kept.exists() and (out / "report.json").exists():
        doc = json.loads(kept.read_text())
        if doc["steps"] == steps:
            return doc
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread each: no oversubscription when the machine is busy
    cmd = [sys.executable, str(HERE / "_recover_run.py"), str(model), method, str(out), str(steps), str(lr)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    atomic_write_json(kept, doc)
    return doc


def evaluate(path: str, label: str, out: Path, limit: int | None, ppl=None) -> dict:
    """Zero-shot accuracy (and held-out perplexity unless the run measured it: `ppl`)."""
    lm = lp.load(path, device="cpu", quiet=True)
    t0 = time.perf_counter()
    if ppl is None:
        ppl = lp.perplexity(lm, "fixture:test", seqlen=128, progress=False)
    zs = zeroshot(lm, "fixture", limit=limit, progress=False)
    atomic_write_json(out / f"eval_{label}.json", results_document(lm, path, [ppl.to_dict()], zs))
    tasks = ", ".join(
        f"{t} {v[v['metric']]:.3f}±{v[v['metric'] + '_stderr']:.3f}" for t, v in zs["tasks"].items()
    )
    print(f"{label}: ppl {ppl.ppl:.2f}; {tasks}; mean {zs['mean']:.3f} ({time.perf_counter() - t0:.0f}s)")
    return {
        "ppl": ppl.ppl,
        "zeroshot": {
            t: {
                k: v[k]
                for k in v
                if k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "samples", "metric")
            }
            for t, v in zs["tasks"].items()
        },
        "zeroshot_mean": zs["mean"],
    }


class _Result:
    """A perplexity result read back from a report.json (what evaluate() needs of one)."""

    def __init__(self, doc: dict):
        self.doc, self.ppl = doc, doc["ppl"]

    def to_dict(self) -> dict:
        return self.doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("fixture", "smollm2"), default="fixture")
    ap.add_argument("-o", "--output", type=Path, default=None, help="default results/recover.json (fixture), "
                    "results/recover_kd.json (smollm2)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (200 fixture, 20 smollm2)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument(
        "--zeroshot-limit",
        type=int,
        default=None,
        help="examples per task (fixture: 250, 0 = all 500, stderr ~0.03 at 250; smollm2: 20)",
    )
    ap.add_argument("--heldout-windows", type=int, default=8, help="smollm2: 512-token windows of each text")
    ap.add_argument("--jobs", type=int, default=1, help="smollm2: rows run at once (fresh processes)")
    ap.add_argument("--models", default="", help="smollm2: only these models' rows, e.g. depth9 (a second "
                    "instance beside a full one: rows are claimed, results merged)")  # fmt: skip
    ap.add_argument("--lr-sweep-only", action="store_true", help="smollm2: only the evaluations and CPT's "
                    "learning-rate sweep on depth9 (the sweep that chose _recover_kd.LR_FULL)")  # fmt: skip
    ap.add_argument(
        "--timing-rounds", type=int, default=3, help="smollm2: interleaved timing rounds (0: none)"
    )
    ap.add_argument(
        "--markdown", action="store_true", help="smollm2: print the tables of the results and stop"
    )
    args = ap.parse_args()
    if args.model == "smollm2" or args.markdown:
        sys.path.insert(0, str(HERE))  # run by docgen (runpy), bench/ is not on the path
        import _recover_kd

        args.output = args.output or HERE / "results" / "recover_kd.json"
        if args.markdown:
            print(_recover_kd.markdown(json.loads(args.output.read_text())))
            return
        args.work = args.work or HERE / "work" / "recover_kd"
        args.steps = args.steps or 20
        args.zeroshot_limit = 20 if args.zeroshot_limit is None else args.zeroshot_limit
        _recover_kd.main(args)
        return
    args.output = args.output or HERE / "results" / "recover.json"
    args.work = args.work or HERE / "work" / "recover"
    args.steps = args.steps or 200
    args.zeroshot_limit = 250 if args.zeroshot_limit is None else args.zeroshot_limit
    args.zeroshot_limit = args.zeroshot_limit or None
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = prepare(args.work)
    runs = []
    for name, path in models.items():
        for method, lr in RUNS:
            label = f"{name}+{method}@{lr:g}"
            r = recover_run(path, method, lr, args.work / label, args.steps)
            r["label"] = label
            runs.append(r)
            print(
                f"{label}: ppl {r['ppl_before']:.2f} -> {r['ppl_after']:.2f}, {r['tokens']:,} tokens in "
                f"{r['train_seconds']:.0f}s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB "
                f"(+{r['training_rss_bytes'] / 2**20:.0f} MiB while training)"
            )
    evals_dir = args.work / "evals"
    evals_dir.mkdir(exist_ok=True)
    zero = {"dense": evaluate("fixture", "dense", evals_dir, args.zeroshot_limit)}
    for name, path in models.items():
        zero[name] = evaluate(str(path), name, evals_dir, args.zeroshot_limit)
    for r in runs:
        # the run measured the held-out perplexity after recovery: reuse it
        after = json.loads((Path(r["output"]) / "report.json").read_text())["recovery"]["perplexity_after"][0]
        zero[r["label"]] = evaluate(
            r["output"], r["label"], evals_dir, args.zeroshot_limit, ppl=_Result(after)
        )
    report = lp.report(
        [*(str(p) for p in models.values()), *(r["output"] for r in runs), str(evals_dir)],
        HERE / "results" / "recover_report",
        overwrite=True,
    )
    lora = {r["label"].split("+")[0]: r for r in runs if r["method"] == "lora" and r["lr"] == 1e-4}
    full = {r["label"].split("+")[0]: r for r in runs if r["method"] == "full"}
    memory = {
        name: {
            "lora_peak_rss_bytes": lora[name]["peak_rss_bytes"],
            "full_peak_rss_bytes": full[name]["peak_rss_bytes"],
            "lora_training_rss_bytes": lora[name]["training_rss_bytes"],
            "full_training_rss_bytes": full[name]["training_rss_bytes"],
            "ratio_peak_lora_over_full": lora[name]["peak_rss_bytes"] / full[name]["peak_rss_bytes"],
            "ratio_training_lora_over_full": lora[name]["training_rss_bytes"]
            / full[name]["training_rss_bytes"],
        }
        for name in lora
    }
    write(
        {
            "setup": {
                "training": f"fixture:train, {args.steps} steps x 8 windows x 128 tokens, AdamW, linear decay after "
                "min(100, 10%) warm-up steps, grad clip 1; LoRA rank 8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,down",
                "heldout": "all of fixture:test, seqlen 128, BOS first",
                "zeroshot": f"bundled offline lm-eval tasks (layerprune eval --tasks fixture), 0-shot, first {args.zeroshot_limit or 500} of 500 examples per task",
                "machine": f"{os.cpu_count()} CPU cores, fp32",
            },
            "runs": runs,
            "memory": memory,
            "evaluations": zero,
            "report": str(report),
            "seconds": time.perf_counter() - t0,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
