"""Peak RSS of one sequential pruning run in a fresh process (used by bench/sparsity.py).

    python bench/_prune_rss.py PRUNER OFFLOAD BATCH

Prints JSON: parameter bytes, RSS before the model was loaded, RSS once the model and the
calibration windows are in memory, and the peak RSS while pruning (VmHWM, reset at that point).
`ratio` = (parameter bytes + what pruning adds to the peak) / parameter bytes: the memory a pruning
run needs against the model it prunes. The Python + torch runtime (~300 MB whatever the model) and
what loading leaves in the allocator are not the pruner's and are reported apart
(`ratio_including_load`, from before the model was loaded).
"""

import json
import sys
import time

from _proc import reset_peak, status


def main(pruner: str, offload: str, batch: int) -> None:
    from layerprune.data import calibration
    from layerprune.models.loading import load
    from layerprune.pruners.unstructured import prune

    before_model = status("VmRSS")
    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm, samples=128, kind="sparsity")  # 128 x min(2048, context)
    targets = {n: 0.5 for n in lm.adapter.layer_names()}
    param_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    reset_peak()
    before_prune = status("VmRSS")
    t0 = time.perf_counter()
    prune(
        lm.model,
        lm.adapter,
        windows.input_ids,
        targets,
        pruner,
        batch_size=batch,
        offload=offload,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    peak = status("VmHWM")
    print(
        json.dumps(
            {
                "pruner": pruner,
                "offload": offload,
                "batch_size": batch,
                "param_bytes": param_bytes,
                "rss_before_model": before_model,
                "rss_before_prune": before_prune,
                "peak_rss": peak,
                "pruning_growth": peak - before_prune,
                "seconds": seconds,
                "ratio": (param_bytes + peak - before_prune) / param_bytes,
                "ratio_including_load": (peak - before_model) / param_bytes,
                "calibration": windows.protocol,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
