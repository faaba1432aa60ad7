"""Scale: models larger than memory, and evaluations spread over torchrun ranks (issue: scale).

    python bench/scale.py [-o bench/results/scale.json] [--layers 22] [--skip-memory] [--skip-dist]

1. P6 memory. A random Llama with TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 32 heads, 4 KV
   heads, vocabulary 32000; `--layers` blocks, 22 by default = 4.4 GB of float32 parameters) saved
   in 1 GB shards. Wanda 50% (8 x 128 tokens of fixture:val), then export, each in a fresh process
   (bench/_scale_prune.py): once with the blocks offloaded (--max-memory 1.5GB) and once loaded
   whole. Peak RSS (VmHWM) of the whole process / parameter bytes, for both; the two exports are
   compared tensor by tensor.
2. Distributed speed-up. Shapley, budget 256, on the bundled model (fixture:val, 10 x 128), with a
   fresh store each: one process with 2 threads against `torchrun --nproc-per-node 2` with 1 thread
   per rank. Wall seconds (process start to exit) and scoring seconds (Scores.seconds); the stores
   must agree bit for bit; the collectives and the scalars exchanged per evaluation.
3. A projection for a 70B model (README's scaling model), from FLOPs, the trie's measured saving on
   the Shapley masks of an 80-block model, and this machine's measured per-block time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _results import write

HERE = Path(__file__).resolve().parent
SHAPES = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
              vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip


def make_model(folder: Path, layers: int) -> None:
    """The random checkpoint, written by a child process (the driver stays small)."""
    if (folder / "model.safetensors.index.json").exists():
        return
    code = f"""
import shutil, torch, transformers as tf
from pathlib import Path
import layerprune as lp
torch.manual_seed(0)
cfg = tf.LlamaConfig(num_hidden_layers={layers}, **{SHAPES!r})
with torch.device("cpu"):
    model = tf.LlamaForCausalLM(cfg)
model.save_pretrained({str(folder)!r}, max_shard_size="1GB")
fixture = Path(lp.__file__).parent / "models" / "fixture"
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(fixture / f, Path({str(folder)!r}) / f)
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def child(model: Path, out: Path, max_memory: str | None) -> dict:
    args = [sys.executable, str(HERE / "_scale_prune.py"), str(model), str(out)] + (
        [max_memory] if max_memory else []
    )
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


def same_exports(a: Path, b: Path) -> dict:
    """Compare two checkpoints tensor by tensor (one tensor in memory at a time)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118
        return out

    ia, ib = index(a), index(b)
    differing = []
    for name in sorted(ia):
        with safe_open(str(ia[name]), framework="pt") as fa, safe_open(str(ib[name]), framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                differing.append(name)
    return {
        "tensors": len(ia),
        "same_names": sorted(ia) == sorted(ib),
        "differing": differing,
        "shards_offloaded_export": sorted(p.name for p in a.glob("*.safetensors")),
        "shards_whole_export": sorted(p.name for p in b.glob("*.safetensors")),
    }


def memory(work: Path, layers: int) -> dict:
    model = work / f"llama-{layers}"
    make_model(model, layers)
    import torch

    from layerprune.models.offload import checkpoint_bytes

    param_bytes, _ = checkpoint_bytes(model, torch.float32)
    off = child(model, work / "out-offloaded", "1.5GB")
    whole = child(model, work / "out-whole", None)
    check = same_exports(work / "out-offloaded", work / "out-whole")
    return {
        "model": {
            "layers": layers,
            **SHAPES,
            "param_bytes": param_bytes,
            "shards": len(list(model.glob("*.safetensors"))),
        },  # fmt: skip
        "offloaded": off,
        "whole": whole,
        "ratio_offloaded": off["peak_rss"] / param_bytes,
        "ratio_offloaded_during_prune": off["peak_rss_prune"] / param_bytes,
        "ratio_whole": whole["peak_rss"] / param_bytes,
        "target": 0.5,
        "identical_exports": check["same_names"] and not check["differing"],
        "comparison": check,
    }


def _run(cmd: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    return time.perf_counter() - t0


def distributed(work: Path, budget: int) -> dict:
    d = work / "dist"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    args = ["score", "fixture", "--method", "shapley", "--budget", str(budget), "--quiet", "--no-plot"]
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one = _run([sys.executable, "-m", "layerprune", *args, "-o", "one.json", "--store", "one.db"],
               {**base, "OMP_NUM_THREADS": "2"}, d)  # fmt: skip
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "layerprune", "--",
                *args, "-o", "two.json", "--store", "two.db"],
               {**base, "OMP_NUM_THREADS": "1", "LAYERPRUNE_DIST_STATS": str(d / "stats")}, d)  # fmt: skip
    s1, s2 = (json.loads((d / f).read_text()) for f in ("one.json", "two.json"))
    db1, db2 = (
        dict(sqlite3.connect(d / f).execute("SELECT key, nll FROM evals")) for f in ("one.db", "two.db")
    )
    ranks = [json.loads((d / f"stats.rank{r}.json").read_text()) for r in range(2)]
    evaluations = s2["extra"]["evaluations_this_run"]
    return {
        "budget": budget,
        "evaluations": evaluations,
        "one_process_2_threads": {"wall_seconds": one, "scoring_seconds": s1["seconds"]},
        "torchrun_2x1_thread": {"wall_seconds": two, "scoring_seconds": s2["seconds"]},
        "speedup_wall": one / two,
        "speedup_scoring": s1["seconds"] / s2["seconds"],
        "identical_utilities": db1 == db2 and len(db1) == evaluations,
        "identical_importance": s1["importance"] == s2["importance"],
        "ranks": ranks,
        "evaluations_per_rank": [r["evaluations"] for r in ranks],
        "scalars_received_per_evaluation": ranks[0]["scalars_received"] / evaluations,
        "collectives": ranks[0]["collectives"],
        "note": "2 cores: one process already uses both through its 2 threads, so the ratio measures "
        "process-level against thread-level parallelism here, not added hardware",
    }


def trie_block_forwards(L: int, budget: int, ratio: float = 0.25) -> dict:
    """Block forwards of the trie walk over the Shapley masks of an L-block model, against running
    each mask alone (kept blocks per mask), counted without a model."""
    from layerprune.scorers.shapley.masks import default_strata, stratified_masks

    masks = sorted({tuple(m) for m in stratified_masks(L, default_strata(L, ratio), budget, 0)}, reverse=True)

    def walk(depth: int, group: list) -> int:
        calls = 0
        while depth < L and len({m[depth] for m in group}) == 1:
            calls += group[0][depth]
            depth += 1
        if depth == L:
            return calls
        for bit in (1, 0):
            sub = [m for m in group if m[depth] == bit]
            calls += bit + walk(depth + 1, sub)
        return calls

    return {"masks": len(masks), "trie": walk(0, masks), "separate": sum(sum(m) for m in masks)}


def projection(block: dict) -> dict:
    """GPU-hours of Shapley (budget 256) and a Self-Pruner search (430 evaluations) on Llama-2-70B,
    for two calibration sizes and two placements: a bf16 replica on two 80 GB GPUs, or one GPU that
    reads each block from host memory as the offloaded path does (once per block forward)."""
    L, h, inter, heads, kv, vocab = 80, 8192, 28672, 64, 8, 32000
    head_dim = h // heads
    params_block = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter
    block_bytes = 2 * params_block  # bf16
    trie = trie_block_forwards(L, 256)
    peak, mfu, pcie = 989e12, 0.4, 50e9  # H100 SXM dense bf16, an assumed utilisation, PCIe 5 x16
    cpu_flops = 2 * block["params"] * block["tokens"] / block["forward_seconds"]
    out = {
        "model": {"name": "Llama-2-70B shapes", "blocks": L, "params_per_block": params_block},
        "shapley_trie_block_forwards": trie,
        "assumed_gpu": {"peak_bf16_flops": peak, "mfu": mfu, "host_to_gpu_bytes_per_second": pcie},
        "measured_cpu_flops_per_second": cpu_flops,
        "calibrations": {},
    }
    for windows, seqlen in ((10, 128), (128, 2048)):
        tokens = windows * seqlen
        flops_block = 2 * params_block * tokens + 4 * windows * seqlen * seqlen * h
        flops_head = 2 * h * vocab * tokens
        compute_s = flops_block / (peak * mfu)
        runs = {
            "shapley_256": (trie["trie"], 256),  # (block forwards, head evaluations)
            "search_430": (430 * L, 430),  # a width candidate runs every block (masked, full size)
        }
        row = {"tokens": tokens, "gpu_seconds_per_block_forward": compute_s}
        for name, (forwards, heads_) in runs.items():
            flops = forwards * flops_block + heads_ * flops_head
            replica_s = flops / (peak * mfu)  # two GPUs hold the replica, one works at a time
            offload_s = forwards * max(compute_s, block_bytes / pcie) + heads_ * flops_head / (peak * mfu)
            row[name] = {
                "pflop": flops / 1e15,
                "gpu_hours_replica_2_gpus": 2 * replica_s / 3600,
                "gpu_hours_offloaded_1_gpu": offload_s / 3600,
                "wall_hours_on_n_gpus_replicas": {n: 2 * replica_s / n / 3600 for n in (2, 8, 64)},
                "this_cpu_hours": flops / cpu_flops / 3600,
            }
        out["calibrations"][f"{windows}x{seqlen}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default=str(HERE / "results" / "scale.json"))
    ap.add_argument("--work", default=str(HERE / "work" / "scale"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-dist", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.output)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.pop("versions", None)
    if not args.skip_memory:
        doc["memory"] = memory(work, args.layers)
        print(json.dumps({k: v for k, v in doc["memory"].items() if k.startswith("ratio")}))
    if not args.skip_dist:
        doc["distributed"] = distributed(work, args.budget)
        print(
            json.dumps(
                {k: doc["distributed"][k] for k in ("speedup_wall", "speedup_scoring", "identical_utilities")}
            )
        )
    if "memory" in doc:
        doc["projection_70b"] = projection(doc["memory"]["offloaded"]["block"])
    write(doc, out)


if __name__ == "__main__":
    main()
