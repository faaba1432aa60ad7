"""Full recovery (`recover --full`) in bf16 and fp16 against fp32, on the CPU (issue 31, item 2).

    python bench/precision_train.py [--steps 20] [--time-steps 12] [--smollm2-steps 3] [--markdown]
    python bench/precision_train.py --only-smollm2 --smollm2-steps 30 --smollm2-windows 16

Each row is one run in a fresh process (bench/_precision_run.py): the bundled model loaded in
float32, bfloat16 or float16, blocks 2, 3, 4 removed (Taylor+'s three lowest on its calibration
text, in every precision), every weight trained for the same steps on the same examples, with the
two ways of keeping a low-precision model's updates (recovery/precision.py): `master` (bf16 / fp16
weights, fp32 master copies and AdamW state) and `autocast` (fp32 weights under torch.autocast,
cast back at the end). Measured per row, as ratios to the fp32 row:
- weights changed: each tensor compared with its copy from before training, in the model's dtype;
  also the fp32 run's changes counted after rounding to bf16 / fp16 (what that precision can show:
  a change under half a unit in the last place of a bf16 weight does not exist in bf16). That
  comparison holds where the checkpoint is bf16 (the fixture: every weight on the bf16 grid); for an
  fp32 checkpoint (SmolLM2 here, from GGUF) a tiny fp32 change flips the rounding of any weight near
  a midpoint, which a bf16 run, starting on the grid, cannot;
- held-out perplexity (fixture:test, seqlen 128, in the model's dtype), before and after;
- peak resident memory while training (VmHWM of the fresh process, less its RSS before training);
- seconds per step: all rows stepped in turn in one process (bench/_precision_time.py), the median
  of --time-steps steps each (on a shared machine, runs minutes apart differ by 2x).
SmolLM2-135M (fp32, bf16 master, bf16 autocast) for a few steps gives the memory and time at a size
where weights, not activations, dominate. Writes bench/results/precision_train.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _results import write

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "precision_train.json"
ROWS = [
    ("float32", "master"),
    ("bfloat16", "master"),
    ("bfloat16", "autocast"),
    ("float16", "master"),
    ("float16", "autocast"),
]
SMOLLM2_ROWS = ROWS[:3]


def run(model, dtype, mode, a, steps, batch, seqlen, windows, remove) -> dict:
    cmd = [sys.executable, str(HERE / "_precision_run.py"), model, dtype, mode]
    cmd += [str(x) for x in (steps, batch, seqlen, a.lr, a.threads, windows, remove)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, check=False)
    if out.returncode:
        raise SystemExit(f"{model} {dtype} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing(model: str, a, rows, steps: int, batch: int, seqlen: int) -> dict:
    cmd = [sys.executable, str(HERE / "_precision_time.py"), model, str(steps), str(batch), str(seqlen)]
    cmd += [str(a.threads), *(f"{d}/{m}" for d, m in rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, check=False)
    if out.returncode:
        raise SystemExit(f"{model} timing failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(model: str, a, rows, steps: int, batch: int, seqlen: int, windows: int, remove: str) -> dict:
    out = {}
    for dtype, mode in rows:
        res = run(model, dtype, mode, a, steps, batch, seqlen, windows, remove)
        out[f"{dtype}/{mode}"] = res
        print(
            f"{model} {dtype}/{mode}: changed {res['changed']:,}, ppl {res['heldout_ppl_before']:.3f} -> "
            f"{res['heldout_ppl']:.3f}, training RSS {res['training_rss_bytes'] / 2**20:.0f} MB",
            flush=True,
        )
        del res["seconds_per_step"]  # of one run alone: see the interleaved timing
    times = timing(model, a, rows, a.time_steps if model == "fixture" else steps + 1, batch, seqlen)
    for name, t in times.items():
        out[name]["seconds_per_step"] = t["median_s"]
        out[name]["seconds_per_step_all"] = t["all_s"]
        print(f"{model} {name}: {t['median_s']:.3f} s/step (median of {len(t['all_s'])})", flush=True)
    ref = out["float32/master"]
    for name, row in out.items():
        as_ = "changed_as_fp16" if name.startswith("float16") else "changed_as_bf16"
        row["vs_fp32"] = {
            "changed": row["changed"] / ref["changed"],
            "changed_vs_fp32_rounded": row["changed"] / max(1, ref[as_]),
            "heldout_ppl": row["heldout_ppl"] / ref["heldout_ppl"],
            "seconds_per_step": row["seconds_per_step"] / ref["seconds_per_step"],
            "training_rss": row["training_rss_bytes"] / ref["training_rss_bytes"],
        }
    return {
        "protocol": {
            "model": model,
            "removed_blocks": remove,
            "steps": steps,
            "batch_size": batch,
            "seqlen": seqlen,
            "lr": a.lr,
            "warmup": 0,
            "train": "fixture:train",
            "heldout": {"text": "fixture:test", "seqlen": 128, "windows": windows},
            "threads": a.threads,
            "timed_steps": len(next(iter(out.values()))["seconds_per_step_all"]),
        },
        "rows": out,
    }


def markdown(doc: dict) -> str:
    lines = []
    for model, t in doc.get("models", {}).items():
        p = t["protocol"]
        lines += [
            f"{model} (blocks removed: {p['removed_blocks']}): `recover --full`, {p['steps']} steps x "
            f"{p['batch_size']} x {p['seqlen']} tokens, lr {p['lr']}, {p['threads']} thread(s), CPU; "
            "ratios to fp32",
            "",
            "| dtype / mode | weights changed | vs fp32 | vs fp32 rounded | held-out ppl before -> after | vs fp32 "
            "| s / step | vs fp32 | training RSS MB | vs fp32 | non-finite |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in t["rows"].items():
            v = r["vs_fp32"]
            lines.append(
                f"| {name} | {r['changed']:,} | {v['changed']:.3f} | {v['changed_vs_fp32_rounded']:.3f} "
                f"| {r['heldout_ppl_before']:.3f} -> {r['heldout_ppl']:.3f} | {v['heldout_ppl']:.4f} "
                f"| {r['seconds_per_step']:.3f} "
                f"| {v['seconds_per_step']:.2f} | {r['training_rss_bytes'] / 2**20:.0f} "
                f"| {v['training_rss']:.2f} | {r['non_finite']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--time-steps", type=int, default=12, help="interleaved timed steps per row (fixture)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--smollm2-steps", type=int, default=3, help="0 leaves SmolLM2 out")
    ap.add_argument("--smollm2-windows", type=int, default=4, help="held-out windows of 128 tokens (SmolLM2)")
    ap.add_argument("--only-smollm2", action="store_true", help="keep the fixture's rows of --output")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true", help="print the tables from the results and stop")
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(a.output.read_text())))
        return
    doc = {"benchmark": "full recovery in bf16 / fp16 against fp32, CPU", "models": {}}
    if a.only_smollm2:
        doc["models"]["fixture"] = json.loads(a.output.read_text())["models"]["fixture"]
    else:
        doc["models"]["fixture"] = table(
            "fixture", a, ROWS, a.steps, a.batch_size, a.seqlen, a.eval_windows, "2,3,4"
        )
    if a.smollm2_steps:  # dense: time and memory at a size where the weights dominate
        doc["models"]["smollm2"] = table(
            "smollm2", a, SMOLLM2_ROWS, a.smollm2_steps, 2, 64, a.smollm2_windows, "-"
        )
    write(doc, a.output)
    print(markdown(doc))


if __name__ == "__main__":
    main()
