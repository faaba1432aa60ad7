"""One Wanda run on a big checkpoint in a fresh process (used by bench/scale.py).

    python bench/_scale_prune.py MODEL OUT [MAX_MEMORY]

Loads MODEL (whole, or with its blocks offloaded when MAX_MEMORY is given), prunes every linear
layer to 50% with Wanda on the calibration windows, exports to OUT, and prints JSON: peak RSS
(VmHWM) over the whole process (start-up, load, prune, export) and during pruning alone, seconds per
stage, and how many times a block was read from disk.
"""

import json
import sys
import time

from _proc import reset_peak, status


def main(model: str, out: str, max_memory: str | None) -> None:
    import layerprune as lp
    from layerprune.data import calibration
    from layerprune.plans import SparsityPlan  # noqa: F401 -- the plan type the run applies

    start = status("VmRSS")
    t0 = time.perf_counter()
    lm = lp.load(model, device="cpu", quiet=True, max_memory=max_memory)
    t_load = time.perf_counter() - t0
    windows = calibration(lm, "fixture:val", samples=8, seqlen=128, kind="sparsity")
    plan = lp.plan(lm, sparsity=0.5, pruner="wanda", calib=windows, progress=False)
    after_load = status("VmRSS")
    peak_load = status("VmHWM")
    reset_peak()
    t0 = time.perf_counter()
    counts = lp.apply(lm, plan, windows, progress=False)
    t_prune = time.perf_counter() - t0
    peak_prune = status("VmHWM")
    reset_peak()
    t0 = time.perf_counter()
    lp.export(lm, out, plan, {"pruning": counts}, overwrite=True)
    t_export = time.perf_counter() - t0
    peak_export = status("VmHWM")
    block = {}
    if lm.offloaded:  # per-block times for the scaling model (README)
        from layerprune.engine.masked import BlockRunner

        runner = BlockRunner(lm.model, lm.adapter, windows.input_ids, batch_size=8)
        states = runner.embed()
        t0 = time.perf_counter()
        for i in range(3):
            with lm.adapter.resident(i):
                pass
        block["read_seconds"] = (time.perf_counter() - t0) / 3
        with lm.adapter.resident(0):
            runner.block(0, states)
            t0 = time.perf_counter()
            for _ in range(3):
                runner.block(0, states)
            block["forward_seconds"] = (time.perf_counter() - t0) / 3
        block["tokens"] = int(windows.input_ids.numel())
        block["params"] = sum(p.numel() for p in lm.adapter.blocks[0].parameters())
    print(
        json.dumps(
            {
                "offloaded": lm.offloaded,
                "max_memory": max_memory,
                "rss_at_start": start,
                "rss_after_load": after_load,
                "peak_rss_load": peak_load,
                "peak_rss_prune": peak_prune,
                "peak_rss_export": peak_export,
                "peak_rss": max(peak_load, peak_prune, peak_export),
                "seconds": {"load": t_load, "prune": t_prune, "export": t_export},
                "block_reads": lm.adapter.offload.loads if lm.offloaded else None,
                "achieved_mean_sparsity": counts["achieved_mean_sparsity"],
                "calibration": windows.protocol,
                "block": block,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
