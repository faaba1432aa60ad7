"""Seconds per training step of every precision row, interleaved in one process (for
bench/precision_train.py): on a machine shared with other work, separate runs minutes apart differ
by 2x; steps that alternate between the rows see the same load.

    python bench/_precision_time.py MODEL STEPS BATCH SEQLEN THREADS ROW [ROW ...]   ROW = dtype/mode

Each row is the (dense) model loaded in its dtype with every weight trainable, its recovery Precision (the
code `recover --full` runs: master copies or autocast, loss scaler) and AdamW; step k of every row
trains on the same examples, rows in a rotating order. Prints JSON: per row, each step's seconds
(forward, backward, optimizer step and the weights' update) after one warm-up step, and the median.
"""

import json
import statistics
import sys
import time

import torch

import layerprune as lp
from layerprune.recovery import load_training_data
from layerprune.recovery.precision import Precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(model, steps, batch, seqlen, threads, *rows) -> None:
    torch.set_num_threads(int(threads))
    steps, batch = int(steps), int(batch)
    runs = {}
    for row in rows:
        dtype, mode = row.split("/")
        torch.manual_seed(0)
        lm = lp.load(model, device="cpu", dtype=DTYPES[dtype], quiet=True)
        trainable = list(lm.model.named_parameters())
        for _, p in trainable:
            p.requires_grad_(True)
        prec = Precision(lm.model, trainable, DTYPES[dtype], lm.device, True, mode)
        opt = torch.optim.AdamW([p for _, p in prec.params], lr=1e-4)
        lm.model.train()
        runs[row] = (lm, prec, opt, [])
    data = load_training_data(next(iter(runs.values()))[0], "fixture:train", int(seqlen))
    for k in range(steps + 1):
        batch_k = data.batch(list(range(k * batch, (k + 1) * batch)), 0)
        order = list(runs)[k % len(runs) :] + list(runs)[: k % len(runs)]
        for row in order:
            lm, prec, opt, times = runs[row]
            t0 = time.perf_counter()
            with prec.autocast():
                loss = lm.model(**batch_k, use_cache=False).loss
            prec.backward(loss)
            prec.step(opt, 1.0)
            prec.to_model()
            if k:  # the first step allocates the optimizer state
                times.append(time.perf_counter() - t0)
    out = {row: {"median_s": statistics.median(t), "all_s": t} for row, (_, _, _, t) in runs.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
