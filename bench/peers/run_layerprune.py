"""layerprune's side of bench/peers.py, in its own process like each peer (our venv).

    python bench/peers/run_layerprune.py --model DIR --ids ids.pt --out OUT --result R.json
        (--sparsity S --pruner wanda|sparsegpt|magnitude [--nm 2:4] [--allocation uniform|owl|alpha]
         | --width B --pruner wanda-sp|magnitude-sp)

What a Python user of the library writes: load, plan, apply, export; calibrated on the given ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ids import EmbeddingTap, fingerprint, load_ids, peak_rss, set_fingerprint  # noqa: E402

import layerprune as lp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--pruner", required=True)
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--width", type=float)
    ap.add_argument("--nm")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-memory", help="blocks stay on disk, one resident at a time (lp.load(max_memory=))")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    imported = time.perf_counter() - T0

    t = time.perf_counter()
    lm = lp.load(a.model, device="cpu", quiet=True, max_memory=a.max_memory)
    ids, meta = load_ids(Path(a.ids))
    windows = lp.Windows(ids, dict(meta["protocol"]))
    loaded = time.perf_counter() - t
    rss = {"after_load": peak_rss()}

    tap = EmbeddingTap(lm.model.get_input_embeddings())
    t = time.perf_counter()
    if a.width is not None:
        plan = lp.plan(
            lm, width=a.width, allocation=a.allocation, pruner=a.pruner, calib=windows, progress=False
        )
        calib = None if a.pruner == "magnitude-sp" else windows
    else:
        options = {"nm": a.nm} if a.nm else {}
        plan = lp.plan(
            lm,
            sparsity=a.sparsity,
            allocation=a.allocation,
            pruner=a.pruner,
            calib=windows,
            progress=False,
            **options,
        )
        calib = None if a.pruner == "magnitude" else windows
    report = lp.apply(lm, plan, calib, batch_size=a.batch_size, progress=False)
    step = time.perf_counter() - t
    tap.close()
    rss["after_step"] = peak_rss()

    t = time.perf_counter()
    lp.export(lm, a.out, plan, report, overwrite=True)
    saved = time.perf_counter() - t
    rss["after_save"] = peak_rss()
    fed = tap.unique_rows()
    out = {
        "tool": "layerprune",
        "import_s": imported,
        "load_s": loaded,
        "step_s": step,
        "save_s": saved,
        "peak_rss_by_phase": rss,
        "fed_fingerprint": fingerprint(fed) if fed.numel() else None,
        "ids_fingerprint": meta["fingerprint"],
        "fed_set_fingerprint": set_fingerprint(fed) if fed.numel() else None,
        "ids_set_fingerprint": meta["set_fingerprint"],
        "layers": plan.layers if hasattr(plan, "layers") and isinstance(plan.layers, dict) else None,
    }
    Path(a.result).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
