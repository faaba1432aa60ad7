"""bf16 and fp16 against float32 on this CPU, stage by stage, on the real model (issue 31, item 9).

    python bench/precision.py [-o bench/results/precision.json] [--model smollm2] [--threads 2]
    python bench/precision.py --markdown            # the table of the last run

Which stages should `--dtype auto` run in bf16 on a CPU that has it (AVX512-BF16 / AMX-BF16,
models/precision.py `cpu_native_bf16`)? One process, the three precisions interleaved stage by stage
(float32, bf16, fp16, so load from other processes falls on all three alike), each stage timed once:
what counts is the ratio float32 seconds / low-precision seconds ("speedup"), not the seconds.

1. the raw linear of SmolLM2's MLP shape, 2048 x 576 @ 576 x 1536, in GFLOP/s (median of 3 rounds);
2. eval: perplexity of 8 x 512 tokens of fixture:test (sizes here are `--size issue`; `quick` halves them);
3. ppl, taylor, angular, bi scoring on 10 x 128 tokens of fixture:val; shapley with a small budget;
   (`--stages ...,depth_search`) a depth search of one generation (its fitness 4 x 128);
4. Wanda and SparseGPT at 50 % (16 x 512 tokens of fixture:val), each on a fresh load, then the
   pruned model's perplexity;
5. LoRA and full recovery, a few steps of 4 x 128 tokens of fixture:train (fresh loads);
6. export of the dense model;
7. float32 arithmetic on the weights rounded to bf16: how much of bf16's perplexity change is the
   rounding of the weights (none for a checkpoint stored in bf16) and how much the arithmetic.

A stage goes to bf16 under `auto` when bf16 is faster (speedup > 1.1, beyond timing noise) and its
results hold: eval perplexity within 0.5 %; ppl scoring's four lowest blocks equal (the other scorers:
their four lowest equal too); Wanda masks >= 99.5 % equal and pruned perplexity within 1 %; SparseGPT
pruned perplexity within 1 %; recovery: changes >= 0.9 x as many weights as float32 (bf16 weights
without a float32 master copy round small updates away). The machine may be shared: timings are noisy,
ratios taken in one process are what this measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import write  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.models.precision import cpu_native_bf16, dtype_name  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW = DTYPES[1:]
EVAL_TEXT, CALIB_TEXT, TRAIN_TEXT = "fixture:test", "fixture:val", "fixture:train"
# (windows, tokens) per stage; "issue": the sizes the issue names; "quick": for a busy shared machine (a
# third of the tokens or less: the dtypes still see the same windows, which is what the comparison needs)
SIZE_SETS = {
    "issue": {"eval": (8, 512), "score": (10, 128), "shapley": (4, 128), "prune": (16, 512), "fitness": (4, 128),
              "recover": (4, 128)},
    "quick": {"eval": (2, 512), "score": (4, 64), "shapley": (2, 64), "prune": (4, 256), "fitness": (2, 64),
              "recover": (2, 64)},
}  # fmt: skip
SIZES = dict(SIZE_SETS["issue"])
SHAPLEY_BUDGET = 16
REPS = 10  # linears per timing of the raw matmul
RECOVER_STEPS = 2
SPEEDUP = 1.1  # below this bf16 is not clearly faster on a shared machine
MIN_CHANGED = 0.9
OUT = HERE / "results" / "precision.json"


def lowest(importance, k: int = 4) -> list[int]:
    return sorted(sorted(range(len(importance)), key=lambda j: importance[j])[:k])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gflops(threads_note: str) -> dict:
    """The raw linear (SmolLM2's MLP up-projection shape), each dtype in turn, 3 rounds."""
    m, k, n = 2048, 576, 1536
    x32, w32 = torch.randn(m, k), torch.randn(n, k)
    runs: dict[str, list[float]] = {dtype_name(d): [] for d in DTYPES}
    for _ in range(3):
        for d in DTYPES:
            x, w = x32.to(d), w32.to(d)
            for _ in range(2):
                torch.nn.functional.linear(x, w)
            t, _ = timed(lambda x=x, w=w: [torch.nn.functional.linear(x, w) for _ in range(REPS)])
            runs[dtype_name(d)].append(2 * m * k * n * REPS / t / 1e9)
    out = {name: round(statistics.median(v), 1) for name, v in runs.items()}
    out["runs"] = {name: [round(x, 1) for x in v] for name, v in runs.items()}
    out["shape"] = f"{m}x{k} @ {k}x{n}"
    out["threads"] = threads_note
    return out


class Bench:
    def __init__(self, model: str):
        self.model = model
        self.dense = {}
        self.rows: dict[str, dict] = {}

    def load(self, dtype):
        return lp.load(self.model, device="cpu", dtype=dtype, quiet=True)

    def lm(self, dtype):
        if dtype not in self.dense:
            self.dense[dtype] = self.load(dtype)
        return self.dense[dtype]

    def ppl(self, lm) -> float:
        n, seqlen = SIZES["eval"]
        return lp.perplexity(lm, EVAL_TEXT, seqlen=seqlen, max_windows=n, progress=False).ppl

    def stage(self, name: str, fn) -> None:
        """fn(dtype) -> (seconds, figures), run for float32, bf16, fp16 in turn."""
        row = {}
        for d in DTYPES:
            try:
                seconds, figures = fn(d)
                row[dtype_name(d)] = {"seconds": round(seconds, 3), **figures}
            except Exception as e:  # one failing precision does not hide the others
                row[dtype_name(d)] = {
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                }
        ref = row["float32"]
        for d in LOW:
            r = row[dtype_name(d)]
            if "seconds" in r and "seconds" in ref:
                r["speedup"] = round(ref["seconds"] / r["seconds"], 3)
        self.rows[name] = row
        print(
            f"{name}: " + "; ".join(f"{k} {v.get('seconds', v.get('error'))}" for k, v in row.items()),
            flush=True,
        )

    # ---- stages ---------------------------------------------------------------------------------

    def eval(self, d):
        lm = self.lm(d)
        return timed(lambda: {"ppl": self.ppl(lm)})

    def score(self, method, size, **options):
        def fn(d):
            lm = self.lm(d)
            calib = lp.calibration(lm, CALIB_TEXT, samples=size[0], seqlen=size[1])
            t, s = timed(lambda: lp.score(lm, method, calib, progress=False, **options))
            return t, {
                "lowest4": lowest(s.importance),
                "importance": [round(float(v), 6) for v in s.importance],
            }

        return fn

    def depth_search(self, d):
        lm = self.lm(d)
        n, seqlen = SIZES["fitness"]
        t, plan = timed(
            lambda: lp.plan(lm, remove=6, allocation="search", calib=CALIB_TEXT, fitness_samples=n,
                            fitness_seqlen=seqlen, generations=1, offspring=4, survivors=(2, 1), progress=False)
        )  # fmt: skip
        return t, {"remove": list(plan.remove), "fitness": plan.extra.get("best_fitness")}

    def prune(self, pruner):
        def fn(d):
            lm = self.load(d)
            n, seqlen = SIZES["prune"]
            calib = lp.calibration(lm, CALIB_TEXT, samples=n, seqlen=seqlen)

            def run():
                plan = lp.plan(lm, sparsity=0.5, pruner=pruner, calib=calib, progress=False)
                return lp.apply(lm, plan, calib, progress=False), plan

            t, (counts, plan) = timed(run)
            a = lm.adapter
            self.masks[(pruner, d)] = {n: a.weight(a.layer(n)) == 0 for n in plan.layers}
            return t, {"achieved_sparsity": counts["achieved_mean_sparsity"], "ppl": self.ppl(lm)}

        return fn

    def recover(self, method):
        def fn(d):
            lm = self.load(d)
            before = {n: p.detach().clone() for n, p in lm.adapter.blocks.named_parameters()}
            n, seqlen = SIZES["recover"]
            t, rec = timed(
                lambda: lp.recover(lm, TRAIN_TEXT, method=method, steps=RECOVER_STEPS, seqlen=seqlen,
                                   batch_size=n, progress=False)
            )  # fmt: skip
            changed = total = nonfinite = 0
            for name, p in lm.adapter.blocks.named_parameters():
                changed += int((p.detach() != before[name]).sum())
                nonfinite += int((~torch.isfinite(p.detach())).sum())
                total += p.numel()
            return t, {"changed_fraction": changed / total, "nonfinite_weights": nonfinite,
                       "losses": [float(x) for x in rec["history"]["loss"]]}  # fmt: skip

        return fn

    def export(self, d):
        lm = self.lm(d)
        with tempfile.TemporaryDirectory() as tmp:
            t, _ = timed(lambda: lp.export(lm, Path(tmp) / "out", None))
        return t, {}

    def rounded(self) -> dict:
        """float32 arithmetic on the weights rounded to bf16: separates what bf16 does to the weights
        (nothing for a checkpoint stored in bf16) from what it does to the arithmetic."""
        lm = self.load(torch.float32)
        with torch.no_grad():
            for p in lm.model.parameters():
                p.copy_(p.bfloat16().float())
        ppl = self.ppl(lm)
        out = {"ppl": ppl}
        ev = self.rows.get("eval", {})
        if "ppl" in ev.get("float32", {}) and "ppl" in ev.get("bfloat16", {}):
            out["ppl_ratio_vs_float32"] = ppl / ev["float32"]["ppl"]
            out["bf16_ppl_ratio_vs_rounded"] = ev["bfloat16"]["ppl"] / ppl
        return out

    def run(self, only: list[str] | None) -> dict:
        self.masks: dict = {}
        stages = [
            ("eval", self.eval),
            ("ppl", self.score("ppl", SIZES["score"])),
            ("taylor", self.score("taylor", SIZES["score"])),
            ("angular", self.score("angular", SIZES["score"])),
            ("bi", self.score("bi", SIZES["score"])),
            ("shapley", self.score("shapley", SIZES["shapley"], budget=SHAPLEY_BUDGET)),
            ("wanda", self.prune("wanda")),
            ("sparsegpt", self.prune("sparsegpt")),
            ("lora", self.recover("lora")),
            ("full", self.recover("full")),
            ("export", self.export),
            ("depth_search", self.depth_search),
        ]
        for name, fn in stages:
            if (only is None and name != "depth_search") or (only is not None and name in only):
                self.stage(name, fn)
        self.compare()
        return self.rows

    # ---- quality against float32 and the decision ------------------------------------------------

    def compare(self) -> None:
        for name, row in self.rows.items():
            ref = row["float32"]
            for d in LOW:
                r = row[dtype_name(d)]
                if "error" in r or "error" in ref:
                    continue
                if "ppl" in r:
                    r["ppl_ratio"] = r["ppl"] / ref["ppl"]
                if "lowest4" in r:
                    r["lowest4_equal"] = r["lowest4"] == ref["lowest4"]
                if (name, d) in self.masks:
                    a, b = self.masks[(name, d)], self.masks[(name, torch.float32)]
                    r["mask_agreement"] = sum(int((a[n] == b[n]).sum()) for n in b) / sum(
                        m.numel() for m in b.values()
                    )
                if "changed_fraction" in r:
                    r["changed_ratio"] = r["changed_fraction"] / ref["changed_fraction"]
                if "remove" in r:
                    r["same_plan"] = r["remove"] == ref["remove"]
                r["holds"], r["why"] = holds(name, r)
                r["auto_bf16"] = d is torch.bfloat16 and r["holds"] and r.get("speedup", 0) > SPEEDUP


def holds(stage: str, r: dict) -> tuple[bool, str]:
    """Whether a low-precision result is within the issue's tolerances of float32's."""
    checks = []
    if stage == "eval":
        checks.append(("perplexity within 0.5 %", abs(r["ppl_ratio"] - 1) <= 0.005))
    if "lowest4_equal" in r:
        checks.append(("four lowest blocks equal", r["lowest4_equal"]))
    if stage == "wanda":
        checks.append(("masks >= 99.5 % equal", r["mask_agreement"] >= 0.995))
    if stage in ("wanda", "sparsegpt"):
        checks.append(("pruned perplexity within 1 %", abs(r["ppl_ratio"] - 1) <= 0.01))
    if "changed_ratio" in r:
        checks.append((f"changes >= {MIN_CHANGED} x float32's weights", r["changed_ratio"] >= MIN_CHANGED))
        checks.append(("finite weights", r["nonfinite_weights"] == 0))
    failed = [c for c, ok in checks if not ok]
    if not checks:
        return True, "no tolerance applies (timing only)"
    return not failed, ("fails: " + ", ".join(failed)) if failed else "within: " + ", ".join(
        c for c, _ in checks
    )


def markdown(doc: dict) -> str:
    g = doc["linear_gflops"]
    lines = [
        f"Raw linear {g['shape']} on {g['threads']}: float32 {g['float32']} GFLOP/s, bfloat16 {g['bfloat16']} "
        f"({g['bfloat16'] / g['float32']:.2f}x), float16 {g['float16']} ({g['float16'] / g['float32']:.2f}x).",
        "",
        "| stage | fp32 s | bf16 s | bf16 speed-up | fp16 s | fp16 speed-up | bf16 vs fp32 | fp16 vs fp32 | auto: bf16 |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for name, row in doc["stages"].items():
        cells = [name, _s(row["float32"])]
        for d in ("bfloat16", "float16"):
            r = row[d]
            cells += [_s(r), f"{r['speedup']:.2f}x" if "speedup" in r else "-"]
        cells += [quality(row["bfloat16"]), quality(row["float16"])]
        cells.append("yes" if row["bfloat16"].get("auto_bf16") else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _s(r: dict) -> str:
    return f"{r['seconds']:.1f}" if "seconds" in r else "error"


def quality(r: dict) -> str:
    if "error" in r:
        return r["error"][:60]
    parts = []
    if "ppl_ratio" in r:
        parts.append(f"ppl x{r['ppl_ratio']:.4f}")
    if "lowest4_equal" in r:
        parts.append("lowest 4 " + ("equal" if r["lowest4_equal"] else f"differ {r['lowest4']}"))
    if "mask_agreement" in r:
        parts.append(f"masks {100 * r['mask_agreement']:.2f} %")
    if "changed_ratio" in r:
        parts.append(f"changed x{r['changed_ratio']:.2f}")
        if r.get("nonfinite_weights"):
            parts.append(f"{r['nonfinite_weights']} non-finite")
    if "same_plan" in r:
        parts.append("same plan" if r["same_plan"] else "other plan")
    return ", ".join(parts) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=str(OUT))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--size", choices=tuple(SIZE_SETS), default="issue", help="windows x tokens per stage")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument(
        "--stages", default=None, help="comma-separated subset of the stages (default: all but depth_search)"
    )
    ap.add_argument("--markdown", action="store_true", help="print the table of the JSON at --out and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    SIZES.update(SIZE_SETS[args.size])
    threads = f"{torch.get_num_threads()} thread(s)"
    t0 = time.perf_counter()
    doc = {
        "benchmark": "precision",
        "model": args.model,
        "cpu_native_bf16": cpu_native_bf16(),
        "cpu_flags": sorted(k for k, v in torch.cpu.get_capabilities().items() if v is True and "bf16" in k),
        "size": args.size,
        "sizes": {k: list(v) for k, v in SIZES.items()},
        "shapley_budget": SHAPLEY_BUDGET,
        "recover_steps": RECOVER_STEPS,
        "threads": torch.get_num_threads(),
        "note": "one process; float32, bf16, fp16 interleaved stage by stage; the machine was shared, "
        "so seconds are noisy and the speed-ups (same-process ratios) are what counts",
        "linear_gflops": gflops(threads),
    }
    print("linear GFLOP/s:", {k: v for k, v in doc["linear_gflops"].items() if k != "runs"}, flush=True)
    bench = Bench(args.model)
    doc["stages"] = bench.run(args.stages.split(",") if args.stages else None)
    doc["float32_math_on_bf16_rounded_weights"] = bench.rounded()
    doc["auto_bf16_stages"] = [n for n, row in doc["stages"].items() if row["bfloat16"].get("auto_bf16")]
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    write(doc, args.out)
    print(markdown(doc))


if __name__ == "__main__":
    main()
