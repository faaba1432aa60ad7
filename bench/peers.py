"""layerprune side by side with the tools a user would pick instead, in one run on this machine.

    python bench/peers.py [--only wanda-50,...] [--repeats 3] [--fresh] [--markdown]

Peers: llm-compressor (Wanda, SparseGPT, magnitude, N:M, OWL profile) and Torch-Pruning (its LLM
example's width pruning). Each peer runs in its own venv, built on first use under
`$LAYERPRUNE_CACHE/peers/` from the pinned `bench/peers/<peer>.txt` (a peer whose venv cannot be built
is skipped, with the reason in the results). Every tool runs in a fresh process on the same model
files (the `smollm2` safetensors folder) and the same calibration token ids (saved once by
bench/peers/ids.py; each runner records the fingerprint of the ids its model's embedding really
received). Every output is evaluated here, by layerprune, on the same held-out windows.

Per run: wall time and peak RSS of the whole process (os.wait4), the pruning step alone (timed by the
runner), held-out perplexity, parameters; for sparsity rows the mask agreement with layerprune's
output per layer type. The timed rows (wanda-50, sparsegpt-50) run --repeats times, interleaved
(layerprune, peer, layerprune, peer, ...), and report the median ratio and its spread.
Resumable: a row already in bench/results/peers.json is skipped (--fresh redoes the rows named).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

from _results import write  # noqa: E402
from ids import save_ids, set_fingerprint  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.io import cache_root  # noqa: E402

RESULTS = HERE / "results" / "peers.json"
WORK = HERE / "work" / "peers"
CALIB, HELDOUT = "fixture:val", "fixture:test"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEERS = {"llm-compressor": "llmcompressor", "torch-pruning": "torchpruning"}
STREAM = "300MB"  # layerprune's --max-memory: the blocks stay on disk, one resident at a time
TP_RATIO = 0.12  # Torch-Pruning's one ratio for channels, hidden size and heads: ~20 % of block parameters
FALLBACK_WIDTH = 0.2  # layerprune's width where Torch-Pruning's run is skipped or failed

# row id -> the runs it compares: (label, tool, runner arguments)
ROWS = {
    "wanda-50": [
        ("layerprune", "layerprune", ["--pruner", "wanda", "--sparsity", "0.5"]),
        ("llm-compressor", "llm-compressor", ["--method", "wanda", "--sparsity", "0.5"]),
        (
            "layerprune streamed",
            "layerprune",
            ["--pruner", "wanda", "--sparsity", "0.5", "--max-memory", STREAM],
        ),
    ],
    "sparsegpt-50": [
        ("layerprune", "layerprune", ["--pruner", "sparsegpt", "--sparsity", "0.5"]),
        ("llm-compressor", "llm-compressor", ["--method", "sparsegpt", "--sparsity", "0.5"]),
        (
            "layerprune streamed",
            "layerprune",
            ["--pruner", "sparsegpt", "--sparsity", "0.5", "--max-memory", STREAM],
        ),
    ],
    "magnitude-50": [
        ("layerprune", "layerprune", ["--pruner", "magnitude", "--sparsity", "0.5"]),
        ("llm-compressor", "llm-compressor", ["--method", "magnitude", "--sparsity", "0.5"]),
    ],
    "wanda-2:4": [
        ("layerprune", "layerprune", ["--pruner", "wanda", "--sparsity", "0.5", "--nm", "2:4"]),
        ("llm-compressor", "llm-compressor", ["--method", "wanda", "--sparsity", "0.5", "--nm", "2:4"]),
    ],
    "sparsegpt-2:4": [
        ("layerprune", "layerprune", ["--pruner", "sparsegpt", "--sparsity", "0.5", "--nm", "2:4"]),
        ("llm-compressor", "llm-compressor", ["--method", "sparsegpt", "--sparsity", "0.5", "--nm", "2:4"]),
    ],
    "wanda-70": [
        ("layerprune uniform", "layerprune", ["--pruner", "wanda", "--sparsity", "0.7"]),
        ("layerprune owl", "layerprune", ["--pruner", "wanda", "--sparsity", "0.7", "--allocation", "owl"]),
        (
            "layerprune alpha",
            "layerprune",
            ["--pruner", "wanda", "--sparsity", "0.7", "--allocation", "alpha"],
        ),
        ("llm-compressor uniform", "llm-compressor", ["--method", "wanda", "--sparsity", "0.7"]),
        (
            "llm-compressor owl",
            "llm-compressor",
            ["--method", "wanda", "--sparsity", "0.7", "--owl", "5,0.08"],
        ),
    ],
    "wanda-50-reference": [  # a third implementation: the Wanda paper's loop on plain transformers layers
        ("layerprune", "layerprune", ["--pruner", "wanda", "--sparsity", "0.5"]),
        ("llm-compressor", "llm-compressor", ["--method", "wanda", "--sparsity", "0.5"]),
        ("reference loop", "reference", ["--sparsity", "0.5"]),
    ],
    "sparsegpt-50-reference": [
        ("layerprune", "layerprune", ["--pruner", "sparsegpt", "--sparsity", "0.5"]),
        ("llm-compressor", "llm-compressor", ["--method", "sparsegpt", "--sparsity", "0.5"]),
        ("reference loop", "reference", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ],
    # the pitfall: every Linear but lm_head, where lm_head's weight is the input embedding
    "wanda-50-all-linears": [
        ("layerprune", "layerprune", ["--pruner", "wanda", "--sparsity", "0.5"]),
        (
            "llm-compressor all linears",
            "llm-compressor",
            ["--method", "wanda", "--sparsity", "0.5", "--targets", "linear"],
        ),
    ],
    "width-20": [  # layerprune's widths are set from what Torch-Pruning removed (same block parameters)
        ("torch-pruning", "torch-pruning", ["--ratio", str(TP_RATIO)]),
        ("layerprune wanda-sp", "layerprune", ["--pruner", "wanda-sp", "--width", "TP"]),
        ("layerprune magnitude-sp", "layerprune", ["--pruner", "magnitude-sp", "--width", "TP"]),
    ],
}
TIMED = ("wanda-50", "sparsegpt-50")
RUNNERS = {
    "layerprune": HERE / "peers" / "run_layerprune.py",
    "llm-compressor": HERE / "peers" / "run_llmcompressor.py",
    "torch-pruning": HERE / "peers" / "run_torchpruning.py",
    "reference": HERE / "peers" / "run_reference.py",
}


# ---- venvs ------------------------------------------------------------------------------------
def peer_python(
    peer: str, requirements: Path | None = None, cache: Path | None = None
) -> tuple[Path | None, str]:
    """The peer's venv python, built from its pinned requirements on first use; (None, why) if it cannot be.

    The venv is made without pip and filled by this interpreter's pip (`pip --python`): seconds, not a
    second copy of pip; its folder is named by the requirements' hash, so a changed pin builds anew."""
    req = requirements or HERE / "peers" / f"{PEERS[peer]}.txt"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:10]
    venv = (cache or cache_root()) / "peers" / f"{req.stem}-{digest}"
    python = venv / "bin" / "python"
    if (venv / "ok").exists():
        return python, "cached"
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}.build.log"
    print(f"building the {peer} venv from {req.name} (log: {log})", flush=True)
    steps = (
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "-r", str(req)],
    )
    with open(log, "w") as f:
        for cmd in steps:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                text = log.read_text().splitlines()
                lines = [ln for ln in text if ln.startswith("ERROR")] or [ln for ln in text if ln.strip()]
                return (
                    None,
                    f"pip install -r {req.name} failed: {lines[-1].strip() if lines else 'no output'} (log {log})",
                )
    (venv / "ok").write_text(req.read_text())
    return python, "built"


# ---- one run ----------------------------------------------------------------------------------
def run_tool(
    python: Path, tool: str, args: list[str], model: Path, ids: Path, out: Path, threads: int
) -> dict:
    """Run one tool in a fresh process; wall time and peak RSS of that process, and the runner's own timings."""
    result = out.with_suffix(".result.json")
    log = out.with_suffix(".log")
    cmd = [str(python), str(RUNNERS[tool]), "--model", str(model), "--out", str(out), "--result", str(result)]
    if tool != "torch-pruning":
        cmd += ["--ids", str(ids)]
    cmd += [*args, "--threads", str(threads)]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"
    )
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{tool} {' '.join(args)} exited {code}: {' | '.join(tail)} (log {log})")
    row = json.loads(result.read_text())
    row.update(
        wall_s=wall, ru_maxrss_bytes=usage.ru_maxrss * 1024, user_s=usage.ru_utime, sys_s=usage.ru_stime
    )
    return with_peak(row)


def with_peak(row: dict) -> dict:
    """Peak RSS of the tool's process = its own VmHWM, read by the runner as it ends. (wait4's ru_maxrss
    is not it: a forked child starts with the parent's resident image, and this driver holds the models
    it evaluates, so every child would report the driver's 3.5 GB.)"""
    phases = row.get("peak_rss_by_phase")
    row["peak_rss_bytes"] = max(phases.values()) if phases else row["ru_maxrss_bytes"]
    return row


# ---- evaluation -------------------------------------------------------------------------------
def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def evaluate(folder: Path, heldout_windows: int) -> dict:
    import torch

    lm = lp.load(str(folder), device="cpu", quiet=True)
    ppl = lp.perplexity(lm, HELDOUT, seqlen=512, max_windows=heldout_windows, progress=False).ppl
    params = {id(p): p for p in lm.model.parameters()}.values()
    blocks = [p for b in lm.adapter.blocks for p in b.parameters()]
    linears = [m.weight for b in lm.adapter.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    emb, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    row = {
        "heldout_ppl": ppl,
        "embedding_sparsity": float((emb == 0).float().mean()),
        "lm_head_sparsity": float((head == 0).float().mean()),
        "lm_head_tied_to_embedding": head.data_ptr() == emb.data_ptr(),
        "params": sum(p.numel() for p in params),
        "block_params": sum(p.numel() for p in blocks),
        "block_linear_sparsity": sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears),
    }
    try:  # what a user of plain transformers gets
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(str(folder))
        row["loads_with_from_pretrained"] = True
    except Exception as e:  # noqa: BLE001 - the message is the finding
        row["loads_with_from_pretrained"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def agreement(a: dict, b: dict) -> dict:
    """Fraction of positions where both masks agree (zero in both or nonzero in both), per layer type."""
    same, total = dict.fromkeys(LINEARS, 0), dict.fromkeys(LINEARS, 0)
    for k, wa in a.items():
        kind = k.split(".")[-2]
        if kind in same and k.endswith(".weight") and ".layers." in k:
            same[kind] += int(((wa == 0) == (b[k] == 0)).sum())
            total[kind] += wa.numel()
    out = {k: same[k] / total[k] for k in LINEARS if total[k]}
    out["all"] = sum(same.values()) / max(1, sum(total.values()))
    return out


def by_block(a: dict, b: dict) -> dict:
    """Mask agreement of every block (all its linears), and the first block where the masks differ."""
    per = {}
    for k, wa in a.items():
        parts = k.split(".")
        if ".layers." in k and k.endswith("proj.weight"):
            i = int(parts[parts.index("layers") + 1])
            same, total = per.get(i, (0, 0))
            per[i] = (same + int(((wa == 0) == (b[k] == 0)).sum()), total + wa.numel())
    agree = [per[i][0] / per[i][1] for i in sorted(per)]
    first = next((i for i, x in enumerate(agree) if x < 1), None)
    return {
        "all": sum(s for s, _ in per.values()) / sum(t for _, t in per.values()),
        "first_block_differing": first,
        "per_block": agree,
    }


# ---- the run ----------------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated rows of: {', '.join(ROWS)}")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of the timed rows")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="redo the rows named by --only (all without it)")
    ap.add_argument(
        "--markdown", action="store_true", help="print the README table from the results and stop"
    )
    ap.add_argument("-o", "--output", type=Path, default=RESULTS)
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PEER=WHY",
        help="leave a peer out of this run, recording why (e.g. it did not finish in an earlier attempt)",
    )
    a = ap.parse_args()

    doc = reread(json.loads(a.output.read_text())) if a.output.exists() else {}
    if a.markdown:
        print(markdown(doc))
        return
    rows = a.only.split(",") if a.only else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]}; use one of {', '.join(ROWS)}")
    doc.setdefault("benchmark", "layerprune and the tools you would use instead, on SmolLM2-135M (fp32), CPU")
    doc.setdefault("rows", {})
    if a.fresh:
        for r in rows:
            doc["rows"].pop(r, None)
            shutil.rmtree(WORK / "runs" / r, ignore_errors=True)

    WORK.mkdir(parents=True, exist_ok=True)
    lm = lp.load("smollm2", device="cpu", quiet=True)
    model = Path(lm.path)
    windows = lp.calibration(lm, CALIB, samples=a.samples, seqlen=a.seqlen, kind="sparsity")
    ids = WORK / "calib.pt"
    fingerprint = save_ids(windows.input_ids, windows.protocol, ids)
    set_print = set_fingerprint(windows.input_ids)
    del lm
    doc["protocol"] = {
        "model": str(model),
        "calibration": {**windows.protocol, "ids_sha256_16": fingerprint, "ids_as_set_sha256_16": set_print},
        "heldout": {"text": HELDOUT, "seqlen": 512, "windows": a.heldout_windows},
        "threads": a.threads,
        "repeats_of_timed_rows": a.repeats,
    }
    pythons = {"layerprune": Path(sys.executable), "reference": Path(sys.executable)}
    doc.setdefault("peers", {})
    skip = dict(x.split("=", 1) for x in a.skip)
    for peer in PEERS:
        if peer in skip:
            doc["peers"][peer] = {"requirements": f"bench/peers/{PEERS[peer]}.txt", "skipped": skip[peer]}
            print(f"skipping {peer}: {skip[peer]}", flush=True)
            continue
        python, how = peer_python(peer)
        doc["peers"][peer] = {
            "requirements": f"bench/peers/{PEERS[peer]}.txt",
            "venv": how if python else None,
        }
        if python:
            pythons[peer] = python
        else:
            doc["peers"][peer]["skipped"] = how
            print(f"skipping {peer}: {how}", flush=True)

    for rid in rows:
        if rid in doc["rows"]:
            print(f"{rid}: in {a.output.name} already (--fresh --only {rid} redoes it)")
            continue
        doc["rows"][rid] = run_row(rid, pythons, model, ids, (fingerprint, set_print), a)
        doc["summary"] = summary(doc["rows"])
        write(doc, a.output)
    print(markdown(doc))


def run_row(rid: str, pythons: dict, model: Path, ids: Path, prints: tuple[str, str], a) -> dict:
    fingerprint, set_print = prints
    specs = [(label, tool, args) for label, tool, args in ROWS[rid] if tool in pythons]
    skipped = [label for label, tool, _ in ROWS[rid] if tool not in pythons]
    repeats = a.repeats if rid in TIMED else 1
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in specs}
    tp_fraction = None
    outs: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for r in range(repeats):
        for label, tool, args in specs:
            out = WORK / "runs" / rid / f"{label.replace(' ', '_')}-r{r}"
            out.parent.mkdir(parents=True, exist_ok=True)
            if "TP" in args:  # Torch-Pruning's removed block parameters, or 20 % where it did not run
                width = FALLBACK_WIDTH if tp_fraction is None else tp_fraction
                args = [str(round(width, 6)) if x == "TP" else x for x in args]
            if label in failed:
                continue
            print(f"{rid} run {r + 1}/{repeats}: {label}", flush=True)
            try:
                row = done_run(out, args, keep=r == 0) or run_tool(
                    pythons[tool], tool, args, model, ids, out, a.threads
                )
            except (
                RuntimeError
            ) as e:  # a tool that fails on its own recipe is a finding, not the end of the run
                print(f"  failed: {e}", flush=True)
                failed[label] = str(e)
                runs.pop(label, None)
                continue
            if tool == "torch-pruning":
                tp_fraction = widths_from(out, row)
            row["args"] = args
            out.with_suffix(".run.json").write_text(json.dumps(row, indent=1))  # a crash later reuses it
            runs[label].append(row)
            if r == 0:
                outs[label] = out
            else:  # the repeats only time; the first run's model is the one evaluated
                shutil.rmtree(out, ignore_errors=True)
    evals = {label: evaluate(outs[label], a.heldout_windows) for label in outs}
    result = {"runs": runs, "eval": evals, "skipped": skipped, "failed": failed}
    for label, rs in runs.items():  # what each model's embedding received, against the file written
        fed = rs[0].get("fed_set_fingerprint")
        if fed is not None and fed != set_print:
            raise SystemExit(
                f"{label} calibrated on other windows ({fed}) than the file written ({set_print})"
            )
        evals[label]["calibration_windows_match"] = None if fed is None else fed == set_print
        evals[label]["calibration_order_match"] = (
            None if fed is None else rs[0]["fed_fingerprint"] == fingerprint
        )
    ours = [lb for lb in outs if lb.startswith("layerprune")]
    if not rid.startswith("width") and ours:
        # each output against layerprune's run of the same recipe (llm-compressor owl <-> layerprune owl)
        result["mask_agreement"] = {}
        for lb in outs:
            if lb == ours[0]:
                continue
            twin = "layerprune" + lb[len(lb.split(" ")[0]) :]
            twin = twin if twin in outs and twin != lb else ours[0]
            result["mask_agreement"][lb] = {"with": twin, **agreement(tensors(outs[twin]), tensors(outs[lb]))}
        if rid.endswith("-reference"):  # every pair, and where along the depth they part
            labels = list(outs)
            result["pairs"] = {
                f"{x} | {y}": by_block(tensors(outs[x]), tensors(outs[y]))
                for k, x in enumerate(labels)
                for y in labels[k + 1 :]
            }
    if rid in TIMED and "llm-compressor" in runs:
        result["ratios"] = ratios(runs)
    for out in outs.values():  # 0.5 GB each; the numbers are what is kept
        shutil.rmtree(out, ignore_errors=True)
    return result


def ratios(runs: dict) -> dict:
    """layerprune / llm-compressor per interleaved pair of runs: median and spread."""
    peer = runs["llm-compressor"]
    return {
        f"{key} {lb} / llm-compressor": spread([x[key] / y[key] for x, y in zip(rs, peer)])
        for lb, rs in runs.items()
        if lb.startswith("layerprune")
        for key in ("wall_s", "peak_rss_bytes", "step_s")
    }


def reread(doc: dict) -> dict:
    """Rows written before peak RSS was read from each process's own VmHWM: recompute it and the ratios."""
    for row in doc.get("rows", {}).values():
        for rs in row["runs"].values():
            for r in rs:
                r.setdefault("ru_maxrss_bytes", r["peak_rss_bytes"])
                with_peak(r)
        if "ratios" in row:
            row["ratios"] = ratios(row["runs"])
    doc["summary"] = summary(doc.get("rows", {}))
    return doc


def done_run(out: Path, args: list[str], keep: bool) -> dict | None:
    """The record of this run from an earlier, interrupted attempt of the row (same arguments; for the
    evaluated first run, its model still on disk): runs are minutes each, a crash should not redo them."""
    record = out.with_suffix(".run.json")
    if not record.exists():
        return None
    row = json.loads(record.read_text())
    if row.get("args") != args or (keep and not (out / "config.json").exists()):
        return None
    print("  (reused from an interrupted attempt)", flush=True)
    return row


def widths_from(out: Path, row: dict) -> float:
    """layerprune's width B that removes the block parameters Torch-Pruning removed: B is a fraction of the
    blocks' prunable (linear) parameters, Torch-Pruning's of all block parameters (norms included)."""
    import torch

    dense = lp.load("smollm2", device="cpu", quiet=True)
    blocks = sum(p.numel() for b in dense.adapter.blocks for p in b.parameters())
    linears = sum(
        m.weight.numel() for b in dense.adapter.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
    )
    return row["block_fraction_removed"] * blocks / linears


def summary(rows: dict) -> dict:
    """The issue's figures: layerprune / llm-compressor on the timed rows (medians of interleaved runs)."""
    out = {}
    for rid, row in rows.items():
        if "ratios" not in row:
            continue
        ev, peer = row["eval"], row["eval"].get("llm-compressor")
        if peer is None:
            continue
        for lb in (lb for lb in ev if lb.startswith("layerprune")):
            out[f"{rid} {lb}"] = {
                "wall_ratio": row["ratios"][f"wall_s {lb} / llm-compressor"],
                "peak_rss_ratio": row["ratios"][f"peak_rss_bytes {lb} / llm-compressor"],
                "step_ratio": row["ratios"][f"step_s {lb} / llm-compressor"],
                "ppl_ratio": ev[lb]["heldout_ppl"] / peer["heldout_ppl"],
                "mask_agreement": row["mask_agreement"]["llm-compressor"]["all"],
            }
    return out


def markdown(doc: dict) -> str:
    lines = [
        "| row | tool | held-out ppl | params (M) | block sparsity | wall s | peak RSS GB | step s | masks = layerprune |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = doc.get("rows", {})
    for rid in sorted(rows, key=lambda r: list(ROWS).index(r) if r in ROWS else len(ROWS)):
        row = rows[rid]
        for label, ev in row["eval"].items():
            runs = row["runs"][label]
            wall = statistics.median(r["wall_s"] for r in runs)
            rss = statistics.median(r["peak_rss_bytes"] for r in runs) / 2**30
            step = statistics.median(r["step_s"] for r in runs)
            agree = row.get("mask_agreement", {}).get(label, {}).get("all")
            lines.append(
                f"| {rid} | {label} | {ev['heldout_ppl']:.2f} | {ev['params'] / 1e6:.1f} | "
                f"{ev['block_linear_sparsity']:.3f} | {wall:.0f} | {rss:.2f} | {step:.0f} | "
                f"{'' if agree is None else f'{100 * agree:.2f} %'} |"
            )
        for label in row.get("skipped", []):
            why = doc.get("peers", {}).get(label, {}).get("skipped", "not run")
            lines.append(f"| {rid} | {label} | skipped: {why} |||||||")
        for label, why in row.get("failed", {}).items():
            last = why.split(" (log ")[0].rsplit(" | ", 1)[-1]
            lines.append(f"| {rid} | {label} | failed: `{last[:100]}` |||||||")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
