"""layerprune's side of bench/peers.py, in its own process like each peer (our venv).

    python bench/peers/run_layerprune.py --model DIR --ids ids.pt --out OUT --result R.json
        (--sparsity S --pruner wanda|sparsegpt|magnitude [--nm 2:4] [--allocation uniform|owl|alpha]
         | --width B --pruner wanda-sp|magnitude-sp)

What a Python user of the library writes: load, plan, apply, export; calibrated on the given ids.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ids import EmbeddingTap, Phases, load_ids, runner_parser  # noqa: E402

import layerprune as lp  # noqa: E402


def main() -> None:
    ap = runner_parser()
    ap.add_argument("--pruner", required=True)
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--width", type=float)
    ap.add_argument("--nm")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-memory", help="blocks stay on disk, one resident at a time (lp.load(max_memory=))")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ph = Phases(T0)
    with ph.phase("load"):
        lm = lp.load(a.model, device="cpu", quiet=True, max_memory=a.max_memory)
        ids, meta = load_ids(Path(a.ids))
        windows = lp.Windows(ids, dict(meta["protocol"]))
    tap = EmbeddingTap(lm.model.get_input_embeddings())
    with ph.phase("step"):
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
    tap.close()
    with ph.phase("save"):
        lp.export(lm, a.out, plan, report, overwrite=True)
    layers = plan.layers if isinstance(getattr(plan, "layers", None), dict) else None
    ph.write(a.result, "layerprune", tap, meta, layers=layers)


if __name__ == "__main__":
    main()
