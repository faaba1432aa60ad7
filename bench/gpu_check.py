"""Every stage of the pipeline in low precision on the compute device, beside float32 on the CPU.

    python bench/gpu_check.py [--device cuda] [--model smollm2] [--dtype bfloat16] [--size full|small]
                              [--out $OUT/gpu_check.json] [--stages eval,ppl,...] [--max-minutes 9]

Run through bench/gpu_check.sh on a lent GPU (it installs carried wheels and reassembles the carried
model first; its header says how to prepare them). `--device cpu` runs both sides on this CPU: bf16
against float32, the same code end to end.

Two sides, stage by stage, the low-precision one first: "low" = (--device, --dtype), "ref" =
(cpu, float32). Each stage runs in try/except on each side (an error is recorded as one line and the
rest goes on) and records its wall time and, on CUDA, the peak memory torch allocated during it. The
comparisons are the issue's tolerances: perplexity within 0.5 % (pruned: 1 %), the four lowest blocks
of ppl / taylor / angular / bi / shapley scores equal, Wanda and SparseGPT masks agreeing (>= 99.5 %
for Wanda), the searches' plans, recovery changing as many weights as float32 (>= 0.9x) with finite
weights, an export that reloads to the same fingerprint, and a GGUF file. The JSON is rewritten after
every stage, so a run stopped at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import layerprune as lp
from layerprune.io import atomic_write_json
from layerprune.models.precision import cpu_native_bf16, dtype_name, parse_dtype

HERE = Path(__file__).resolve().parent
EVAL_TEXT, CALIB_TEXT, TRAIN_TEXT = "fixture:test", "fixture:val", "fixture:train"
STAGES = (
    "load", "matmul", "eval", "ppl", "taylor", "angular", "bi", "wanda", "export", "gguf", "sparsegpt",
    "lora", "full", "shapley", "depth_search", "width_search", "sparsity_search",
)  # fmt: skip
# (windows, tokens) of each stage's text; small: a CPU run of a few minutes on the real model
SIZES = {
    "full": {
        "eval": (8, 512), "score": (10, 128), "shapley": (4, 128), "shapley_budget": 64,
        "prune": (16, 512), "fitness": (8, 128), "generations": 3, "offspring": 8,
        "recover_steps": 4, "recover": (4, 256),
    },
    "small": {
        "eval": (4, 128), "score": (4, 64), "shapley": (2, 64), "shapley_budget": 12,
        "prune": (4, 128), "fitness": (2, 64), "generations": 1, "offspring": 2,
        "recover_steps": 2, "recover": (2, 64),
    },
}  # fmt: skip


@dataclass
class Side:
    name: str  # "low" or "ref"
    device: str
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.device}/{dtype_name(self.dtype)}"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def one_line(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}{at}"[:600]


def lowest(importance, k: int = 4) -> list[int]:
    """The k least important units (what a depth plan removes first)."""
    return sorted(sorted(range(len(importance)), key=lambda j: importance[j])[:k])


def spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


class Check:
    def __init__(self, args):
        self.args = args
        self.size = SIZES[args.size]
        low_dtype = parse_dtype(args.dtype)
        if low_dtype == "auto":
            raise SystemExit("--dtype: name the low precision (bfloat16 or float16)")
        self.low = Side("low", args.device, low_dtype)
        self.ref = Side("ref", "cpu", torch.float32)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check."))
        self.dense: dict[str, object] = {}  # side name -> the dense model, kept for read-only stages
        self.kept: dict[tuple[str, str], object] = {}  # (stage, side) -> what a later stage compares
        self.t0 = time.perf_counter()
        self.doc = {
            "benchmark": "gpu_check",
            "model": args.model,
            "size": args.size,
            "sizes": self.size,
            "low": self.low.label,
            "ref": self.ref.label,
            "environment": environment(args.device),
            "stages": {},
        }

    # ---- plumbing ------------------------------------------------------------------------------

    def sides(self):
        return (self.low, self.ref)

    def load(self, side: Side):
        return lp.load(self.args.model, device=side.device, dtype=side.dtype, quiet=True)

    def model(self, side: Side):
        if side.name not in self.dense:
            self.dense[side.name] = self.load(side)
        return self.dense[side.name]

    def windows(self, side: Side, source: str, size: tuple[int, int]):
        return lp.calibration(self.model(side), source, samples=size[0], seqlen=size[1])

    def ppl(self, lm) -> float:
        n, seqlen = self.size["eval"]
        return lp.perplexity(lm, EVAL_TEXT, seqlen=seqlen, max_windows=n, progress=False).ppl

    def run_stage(self, name: str, fn, compare=None) -> None:
        if name not in self.args.stages:
            return
        elapsed = (time.perf_counter() - self.t0) / 60
        rec: dict = {}
        if self.args.max_minutes and elapsed > self.args.max_minutes:
            rec["skipped"] = f"the run passed --max-minutes {self.args.max_minutes} ({elapsed:.1f} min)"
        else:
            for side in self.sides():
                rec[side.name] = self.timed(side, fn)
            if compare and all("error" not in rec[s.name] for s in self.sides()):
                try:
                    rec["compare"] = compare(rec["low"], rec["ref"])
                except Exception as e:  # a comparison that fails is recorded like a stage
                    rec["compare"] = {"error": one_line(e)}
            for s in self.sides():  # payloads (masks, weights) stay out of the JSON
                rec[s.name] = {k: v for k, v in rec[s.name].items() if not k.startswith("_")}
        self.doc["stages"][name] = rec
        self.doc["elapsed_seconds"] = round(time.perf_counter() - self.t0, 1)
        self.save()
        print(f"[{self.doc['elapsed_seconds']:7.1f}s] {name}: {summary_line(rec)}", flush=True)

    def timed(self, side: Side, fn) -> dict:
        if side.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out = fn(side) or {}
        except Exception as e:
            out = {"error": one_line(e)}
        if side.cuda:
            torch.cuda.synchronize()
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    def save(self) -> None:
        self.doc["summary"] = summarize(self.doc)
        atomic_write_json(self.args.out, self.doc)

    # ---- the stages ----------------------------------------------------------------------------

    def stage_load(self, side: Side) -> dict:
        lm = self.model(side)
        out = {"fingerprint": lm.fingerprint, "dtype": dtype_name(next(lm.model.parameters()).dtype)}
        # the same dtype on the other side's device: fingerprints must agree across devices
        other = self.ref.device if side is self.low else self.low.device
        if other != side.device:
            twin = lp.load(self.args.model, device=other, dtype=side.dtype, quiet=True)
            out["fingerprint_on_" + other] = twin.fingerprint
            del twin
        return out

    def stage_matmul(self, side: Side) -> dict:
        """GFLOP/s of a linear of SmolLM2's MLP shape (2048 x 576 @ 576 x 1536), side's dtype vs fp32."""
        out = {}
        for dt in (side.dtype, torch.float32):
            x = torch.randn(2048, 576, device=side.device, dtype=dt)
            w = torch.randn(1536, 576, device=side.device, dtype=dt)
            reps = 200 if side.cuda else 10
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            sync(side)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            sync(side)
            out[f"gflops_{dtype_name(dt)}"] = round(
                2 * 2048 * 576 * 1536 * reps / (time.perf_counter() - t0) / 1e9, 1
            )
        return out

    def stage_eval(self, side: Side) -> dict:
        return {"ppl": self.ppl(self.model(side))}

    def score_stage(self, method: str, size_key: str, **options):
        def fn(side: Side) -> dict:
            lm = self.model(side)
            calib = self.windows(side, CALIB_TEXT, self.size[size_key])
            s = lp.score(lm, method, calib, progress=False, **options)
            return {"lowest4": lowest(s.importance), "importance": [float(v) for v in s.importance]}

        return fn

    def prune_stage(self, pruner: str):
        def fn(side: Side) -> dict:
            lm = self.load(side)  # a fresh model: the dense one stays for the other stages
            calib = lp.calibration(
                lm, CALIB_TEXT, samples=self.size["prune"][0], seqlen=self.size["prune"][1]
            )
            plan = lp.plan(lm, sparsity=0.5, pruner=pruner, calib=calib, progress=False)
            counts = lp.apply(lm, plan, calib, progress=False)
            a = lm.adapter
            masks = {n: (a.weight(a.layer(n)) == 0).cpu() for n in plan.layers}
            if pruner == "wanda":  # exported by the export stage
                self.kept[("wanda", side.name)] = (lm, plan)
            return {
                "achieved_sparsity": counts["achieved_mean_sparsity"],
                "ppl": self.ppl(lm),
                "fingerprint": lm.fingerprint,
                "_masks": masks,
            }

        return fn

    def stage_depth_search(self, side: Side) -> dict:
        lm = self.model(side)
        before = lm.fingerprint
        plan = lp.plan(lm, remove=max(2, lm.adapter.num_blocks // 5), allocation="search", calib=CALIB_TEXT,
                       **self.search_options(), survivors=(2, 1), progress=False)  # fmt: skip
        return {"remove": [str(u) for u in plan.remove], "model_unchanged": lm.fingerprint == before,
                **search_record(plan)}  # fmt: skip

    def stage_width_search(self, side: Side) -> dict:
        lm = self.model(side)
        before = lm.fingerprint
        n, seqlen = self.size["fitness"]
        calib = self.windows(side, CALIB_TEXT, self.size["score"])
        g, o = self.size["generations"], self.size["offspring"]
        plan = lp.plan(lm, width=0.2, allocation="search", calib=calib, fitness_samples=n, fitness_seqlen=seqlen,
                       population=max(4, o), iterations=g, crossovers=max(1, o // 2), mutations=max(1, o // 2),
                       progress=False)  # fmt: skip
        rates = [round(float(r), 4) for r in plan.attn + plan.mlp]
        return {"rates": rates, "model_unchanged": lm.fingerprint == before,
                **search_record(plan)}  # fmt: skip

    def stage_sparsity_search(self, side: Side) -> dict:
        lm = self.model(side)
        before = lm.fingerprint
        calib = self.windows(side, CALIB_TEXT, self.size["prune"])
        db = self.work / f"levels-{side.name}"
        shutil.rmtree(db, ignore_errors=True)
        plan = lp.plan(lm, sparsity=0.5, allocation="search", pruner="wanda", calib=calib, max_levels=2,
                       levels_db=str(db), survivors=(2, 1), **self.search_options(), progress=False)  # fmt: skip
        return {"levels": plan.extra.get("levels"), "model_unchanged": lm.fingerprint == before,
                **search_record(plan)}  # fmt: skip

    def search_options(self) -> dict:
        n, seqlen = self.size["fitness"]
        return {"fitness_samples": n, "fitness_seqlen": seqlen, "generations": self.size["generations"],
                "offspring": self.size["offspring"]}  # fmt: skip

    def recover_stage(self, method: str):
        def fn(side: Side) -> dict:
            lm = self.load(side)
            params = {n: p.detach().to("cpu", copy=True) for n, p in lm.adapter.blocks.named_parameters()}
            n, seqlen = self.size["recover"]
            rec = lp.recover(lm, TRAIN_TEXT, method=method, steps=self.size["recover_steps"], seqlen=seqlen,
                             batch_size=n, progress=False)  # fmt: skip
            changed = total = nonfinite = 0
            for name, p in lm.adapter.blocks.named_parameters():
                new = p.detach().cpu()
                changed += int((new != params[name]).sum())
                nonfinite += int((~torch.isfinite(new)).sum())
                total += new.numel()
            losses = [float(x) for x in rec["history"]["loss"]]
            return {
                "changed_fraction": changed / total,
                "nonfinite_weights": nonfinite,
                "losses": losses[:50],
                "ppl_after": self.ppl(lm) if not nonfinite else None,
            }

        return fn

    def stage_export(self, side: Side) -> dict:
        if ("wanda", side.name) not in self.kept:
            raise RuntimeError("needs the wanda stage's model (run with --stages including wanda)")
        lm, plan = self.kept[("wanda", side.name)]
        out = self.work / f"export-{side.name}"
        lp.export(lm, out, plan, overwrite=True)
        back = lp.load(str(out), device=side.device, dtype=side.dtype, quiet=True)
        config = json.loads((out / "config.json").read_text())
        return {
            "config_dtype": config.get("dtype") or config.get("torch_dtype"),
            "tensor_dtypes": sorted(safetensors_dtypes(out)),
            "reload_fingerprint_equal": back.fingerprint == lm.fingerprint,
            "reload_ppl_ratio": ratio(self.ppl(back), self.ppl(lm)),
            "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        }

    def stage_gguf(self, side: Side) -> dict:
        folder = self.work / f"export-{side.name}"
        if not (folder / "config.json").is_file():
            raise RuntimeError("needs the export stage's folder")
        out = self.work / f"model-{side.name}.gguf"
        lp.export_gguf(folder, out, outtype="auto", overwrite=True)
        return {"bytes": out.stat().st_size}

    def expected(self) -> dict | None:
        if not self.args.expect:
            return None
        doc = json.loads(Path(self.args.expect).read_text())
        self.doc["expected"] = doc
        return doc["fingerprints"]

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> dict:
        from layerprune.models.loading import resolve

        t0 = time.perf_counter()  # a .gguf is converted once, before any stage is timed
        try:
            resolve(self.args.model, quiet=True)
        except Exception as e:
            self.doc["resolve_error"] = one_line(e)
        self.doc["resolve_seconds"] = round(time.perf_counter() - t0, 1)
        self.run_stage("load", self.stage_load, compare_load(self.expected()))
        self.run_stage("matmul", self.stage_matmul)
        self.run_stage("eval", self.stage_eval, compare_ppl(0.005))
        self.run_stage("ppl", self.score_stage("ppl", "score"), compare_scores)
        self.run_stage("taylor", self.score_stage("taylor", "score"), compare_scores)
        self.run_stage("angular", self.score_stage("angular", "score"), compare_scores)
        self.run_stage("bi", self.score_stage("bi", "score"), compare_scores)
        self.run_stage("wanda", self.prune_stage("wanda"), compare_masks(0.995, 0.01))
        self.run_stage("export", self.stage_export, compare_export)
        self.kept.clear()
        self.run_stage("gguf", self.stage_gguf)
        self.run_stage("sparsegpt", self.prune_stage("sparsegpt"), compare_masks(None, 0.01))
        self.run_stage("lora", self.recover_stage("lora"), compare_recovery)
        self.run_stage("full", self.recover_stage("full"), compare_recovery)
        # the searches last: the costliest, and the first skipped when --max-minutes runs out
        budget = self.size["shapley_budget"]
        self.run_stage("shapley", self.score_stage("shapley", "shapley", budget=budget), compare_scores)
        self.run_stage("depth_search", self.stage_depth_search, compare_plans("remove"))
        self.run_stage("width_search", self.stage_width_search, compare_plans("rates"))
        self.run_stage("sparsity_search", self.stage_sparsity_search, compare_plans("levels"))
        self.doc["done"] = True
        self.save()
        return self.doc


# ---- comparisons (low against ref) ------------------------------------------------------------


def compare_load(expected: dict | None):
    def fn(low: dict, ref: dict) -> dict:
        out = {"same_fingerprint_low_vs_ref": low["fingerprint"] == ref["fingerprint"]}
        across = [(low["fingerprint"], v) for k, v in low.items() if k.startswith("fingerprint_on_")]
        across += [(ref["fingerprint"], v) for k, v in ref.items() if k.startswith("fingerprint_on_")]
        if across:
            out["fingerprints_equal_across_devices"] = all(a == b for a, b in across)
        if expected:  # the same dtype on the CPU of the machine that prepared the run
            out["fingerprints_equal_across_machines"] = all(
                expected.get(f"cpu/{r['dtype']}") == r["fingerprint"] for r in (low, ref)
            )
        return out

    return fn


def compare_ppl(tolerance: float):
    def fn(low: dict, ref: dict) -> dict:
        r = low["ppl"] / ref["ppl"]
        return {"ppl_ratio": r, "within": abs(r - 1) <= tolerance, "tolerance": tolerance}

    return fn


def compare_scores(low: dict, ref: dict) -> dict:
    return {
        "lowest4_equal": low["lowest4"] == ref["lowest4"],
        "spearman": spearman(low["importance"], ref["importance"]),
    }


def compare_masks(min_agreement: float | None, ppl_tolerance: float):
    def fn(low: dict, ref: dict) -> dict:
        a, b = low["_masks"], ref["_masks"]
        equal = sum(int((a[n] == b[n]).sum()) for n in b)
        total = sum(m.numel() for m in b.values())
        r = low["ppl"] / ref["ppl"]
        out = {"mask_agreement": equal / total, "ppl_ratio": r, "ppl_within": abs(r - 1) <= ppl_tolerance}
        if min_agreement is not None:
            out["masks_within"] = equal / total >= min_agreement
        return out

    return fn


def compare_plans(key: str):
    def fn(low: dict, ref: dict) -> dict:
        return {
            "same_plan": low[key] == ref[key],
            "fitness_ratio": ratio(low.get("fitness"), ref.get("fitness")),
        }

    return fn


def compare_recovery(low: dict, ref: dict) -> dict:
    r = ratio(low["changed_fraction"], ref["changed_fraction"])
    return {
        "changed_ratio": r,
        "changed_within": r is not None and r >= 0.9,
        "finite": low["nonfinite_weights"] == 0,
        "ppl_ratio": ratio(low.get("ppl_after"), ref.get("ppl_after")),
    }


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def compare_export(low: dict, ref: dict) -> dict:
    def states(r):  # config.json's dtype is the one its tensors are stored in
        return [SAFETENSORS_DTYPES.get(t, t) for t in r["tensor_dtypes"]] == [r["config_dtype"]]

    return {
        "both_reload_equal": low["reload_fingerprint_equal"] and ref["reload_fingerprint_equal"],
        "config_dtype_states_tensors": states(low) and states(ref),
    }


# ---- helpers ----------------------------------------------------------------------------------


def sync(side: Side) -> None:
    if side.cuda:
        torch.cuda.synchronize()


def search_record(plan) -> dict:
    fit = plan.extra.get("best_fitness")
    return {
        "fitness": float(fit) if fit is not None else None,
        "evaluations": plan.extra.get("evaluations_this_run"),
    }


def safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                out.add(st.get_slice(k).get_dtype())
    return out


def environment(device: str) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_native_bf16": cpu_native_bf16(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["cuda"] = torch.version.cuda
        env["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def summary_line(rec: dict) -> str:
    if "skipped" in rec:
        return rec["skipped"]
    parts = []
    for s in ("low", "ref"):
        r = rec.get(s, {})
        parts.append(f"{s} {'ERROR ' + r['error'] if 'error' in r else str(r.get('seconds')) + 's'}")
    if "compare" in rec:
        parts.append(json.dumps(rec["compare"], default=str))
    return "; ".join(parts)


def summarize(doc: dict) -> dict:
    """The figures a note quotes: per stage the times and their ratio, peak GPU memory, the checks."""
    out: dict = {"errors": {}, "checks_failed": []}
    for name, rec in doc["stages"].items():
        if "skipped" in rec:
            out.setdefault("skipped", []).append(name)
            continue
        row = {}
        for s in ("low", "ref"):
            r = rec.get(s, {})
            row[f"{s}_seconds"] = r.get("seconds")
            if "error" in r:
                out["errors"][f"{name}.{s}"] = r["error"]
            if r.get("peak_gpu_bytes"):
                row["peak_gpu_mib"] = round(r["peak_gpu_bytes"] / 2**20, 1)
        row["speedup"] = ratio(row["ref_seconds"], row["low_seconds"])
        for k, v in (rec.get("compare") or {}).items():
            if isinstance(v, (bool, int, float, str)) or v is None:
                row[k] = v
            if isinstance(v, bool) and not v and k != "same_fingerprint_low_vs_ref":
                out["checks_failed"].append(f"{name}.{k}")
        out[name] = row
    return out


def write_expected(model: str, path: str) -> dict:
    """The model's fingerprints on this machine's CPU in each dtype: another machine must find the same."""
    import transformers

    doc = {
        "model": model,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fingerprints": {},
    }
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        lm = lp.load(model, device="cpu", dtype=dt, quiet=True)
        doc["fingerprints"][f"cpu/{dtype_name(dt)}"] = lm.fingerprint
        del lm
    atomic_write_json(path, doc)
    print(f"wrote {path}: {doc['fingerprints']}")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the low-precision side's device (cuda, cpu)")
    ap.add_argument("--model", default="smollm2", help="smollm2, fixture, a model folder or a .gguf file")
    ap.add_argument("--dtype", default="bfloat16", help="the low-precision side's dtype")
    ap.add_argument(
        "--size", choices=tuple(SIZES), default=None, help="full on CUDA, small on CPU by default"
    )
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--out", default=None, help="the JSON (default $OUT/gpu_check.json, else bench/results/)")
    ap.add_argument(
        "--work", default=None, help="folder for exports and level databases (default: a temp dir)"
    )
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="skip the stages left after this (CUDA: 8.5)"
    )
    ap.add_argument(
        "--expect", default=None, help="fingerprints the model had elsewhere (--expect-only's JSON)"
    )
    ap.add_argument(
        "--expect-only", default=None, help="write the model's CPU fingerprints to this JSON and stop"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expect_only:
        write_expected(args.model, args.expect_only)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; use --device cpu")
    args.size = args.size or ("full" if args.device.startswith("cuda") else "small")
    if args.max_minutes is None and args.device.startswith("cuda"):
        args.max_minutes = 8.5
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.out is None:
        args.out = (
            str(Path(os.environ["OUT"]) / "gpu_check.json")
            if os.environ.get("OUT")
            else str(HERE / "results" / f"gpu_check_{args.device.split(':')[0]}.json")
        )
    print(f"gpu_check: {args.model} {dtype_name(parse_dtype(args.dtype))} on {args.device} vs float32 on cpu, "
          f"size {args.size} -> {args.out}", flush=True)  # fmt: skip
    doc = Check(args).run()
    print(json.dumps(doc["summary"], indent=1, default=str))
    return 0 if not doc["summary"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
