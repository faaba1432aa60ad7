"""Does distillation pull ahead of CPT with more tokens, or with the LM loss mixed in? (issue 34's KD <= 0.9 x CPT)

    python bench/_recover_kd_budget.py [--steps 80] [--jobs 2]

On bench/recover.py's depth9 model (SmolLM2, blocks 12-18, 25, 26 removed) with its recipe (fixture:train, seqlen 128,
batch 4, AdamW at lr 2e-4, warm-up 10 % then linear decay, seed 0): CPT, KD + full from the cached teacher (top-64) and
KD + full with 0.5 x the LM loss mixed in (`--kd-mix 0.5`), at --steps (4 x the bench's 20 by default) and the mixed row
also at 20 steps (the bench's own CPT and KD rows at 20 steps are in recover_kd.json). Held-out perplexity on
fixture:test and on the licence texts, 8 windows of 512 tokens each. The teacher cache of --steps covers the windows
those steps train on (bench/work/recover_kd/cache-k64-sN). Writes bench/results/recover_kd_budget.json after each row.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _recover_kd as kd  # noqa: E402
from _results import write  # noqa: E402

OUT = HERE / "results" / "recover_kd_budget.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    work = HERE / "work" / "recover_kd"
    model = kd.prune(work, {"depth9"})["depth9"]["path"]
    other, _ = kd.licence_text(work)
    doc = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
    doc["protocol"] = {"model": "depth9 of bench/recover.py", "lr": kd.LR_FULL, "batch": 4, "seqlen": 128,
                       "heldout_windows": 8, "topk": 64, "training": "fixture:train, the same windows per step count"}  # fmt: skip

    def cache(steps: int) -> str:
        path = work / ("cache-k64" if steps == 20 else f"cache-k64-s{steps}")
        if not (path / "manifest.json").exists():
            spec = {"build_cache": str(path), "topk": 64, "teacher": kd.DENSE, "steps": steps, "batch": 4,
                    "seqlen": 128, "lr": kd.LR_FULL}  # fmt: skip
            doc["rows"][f"cache/s{steps}"] = kd.run(spec)
        return str(path)

    rows = []
    for steps in (args.steps,):
        rows += [(f"s{steps}/cpt", {"steps": steps}), (f"s{steps}/kd-full-cache", {"steps": steps, "topk": 64}),
                 (f"s{steps}/kd-mix0.5-cache", {"steps": steps, "topk": 64, "kd_mix": 0.5})]  # fmt: skip
    rows.append(("s20/kd-mix0.5-cache", {"steps": 20, "topk": 64, "kd_mix": 0.5}))
    caches = {steps: cache(steps) for steps in {s["steps"] for _, s in rows}}

    lock = threading.Lock()

    def one(key: str, extra: dict) -> None:
        if key in doc["rows"]:
            return
        spec = {"model": model, "method": "full", "batch": 4, "seqlen": 128, "lr": kd.LR_FULL, "other": str(other),
                "heldout_windows": 8, "zeroshot_limit": 0, **extra}  # fmt: skip
        if spec.get("topk"):
            spec["cache"] = caches[spec["steps"]]
        out = {**kd.run(spec), **extra}
        with lock:
            doc["rows"][key] = out
            write(doc, OUT)
        print(f"{key}: held-out {doc['rows'][key]['heldout_ppl']:.2f}, other {doc['rows'][key]['other_ppl']:.2f}",
              flush=True)  # fmt: skip

    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(one, k, e) for k, e in rows]:
            f.result()
    write(doc, OUT)


if __name__ == "__main__":
    main()
