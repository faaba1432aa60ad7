"""One full-recovery run in a fresh process, for bench/precision_train.py.

    python bench/_precision_run.py MODEL DTYPE MODE STEPS BATCH SEQLEN LR THREADS EVAL_WINDOWS REMOVE

Loads MODEL in DTYPE on the CPU, removes the blocks REMOVE (comma-separated, or "-" for none), trains every weight for STEPS steps on the start of fixture:train
(`recover --full`, warm-up 0) with the low-precision MODE (master | autocast), and prints JSON: the
weights that changed (each tensor compared with its copy from before training, in the model's dtype,
and after rounding both to bf16 and fp16), non-finite weights, held-out perplexity of fixture:test
in the model's dtype, the seconds of each step, peak resident memory while training (VmHWM after a
reset, less the RSS before it), and the dtypes of the in-memory weights and of the exported tensors.
"""

import json
import sys
import tempfile
import time

import torch
from _proc import reset_peak, status
from safetensors import safe_open

import layerprune as lp
from layerprune.recovery import RecoveryConfig, load_training_data
from layerprune.recovery.train import recover

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def changed(before: dict, model, dtype=None) -> int:
    n = 0
    for name, p in model.named_parameters():
        a, b = before[name], p.detach()
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        n += int((a != b).sum())
    return n


def main(model, dtype, mode, steps, batch, seqlen, lr, threads, eval_windows, remove) -> None:
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    lm = lp.load(model, device="cpu", dtype=DTYPES[dtype], quiet=True)
    if remove != "-":
        lm.adapter.remove_blocks([int(i) for i in remove.split(",")])
        lm.modified()
    ppl_before = lp.perplexity(lm, "fixture:test", seqlen=128, max_windows=int(eval_windows), progress=False)
    data = load_training_data(lm, "fixture:train", int(seqlen))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    cfg = RecoveryConfig(method="full", steps=int(steps), batch_size=int(batch), lr=float(lr), warmup=0)
    reset_peak()
    rss = status("VmRSS")
    t0 = time.perf_counter()
    record = recover(lm, data, cfg, progress=False, mode=mode)
    wall = time.perf_counter() - t0
    peak = status("VmHWM")
    weights = sum(p.numel() for p in before.values())
    ppl = lp.perplexity(lm, "fixture:test", seqlen=128, max_windows=int(eval_windows), progress=False).ppl
    with tempfile.TemporaryDirectory() as tmp:
        lp.export(lm, f"{tmp}/out", None)
        with safe_open(f"{tmp}/out/model.safetensors", "pt") as f:
            exported = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    print(
        json.dumps(
            {
                "model": model,
                "dtype": dtype,
                "mode": record["precision"]["mode"],
                "precision": record["precision"],
                "steps": record["steps"],
                "tokens": record["tokens"],
                "seconds_per_step": wall / max(1, record["steps"]),
                "weights": weights,
                "changed": changed(before, lm.model),
                "changed_as_bf16": changed(before, lm.model, torch.bfloat16),
                "changed_as_fp16": changed(before, lm.model, torch.float16),
                "non_finite": sum(int((~torch.isfinite(p)).sum()) for p in lm.model.parameters()),
                "loss_first": record["history"]["loss"][0],
                "loss_last": record["history"]["loss"][-1],
                "removed_blocks": remove,
                "heldout_ppl_before": ppl_before.ppl,
                "heldout_ppl": ppl,
                "training_rss_bytes": peak - rss,
                "weights_dtype": sorted({str(p.dtype) for p in lm.model.parameters()}),
                "source_dtype": str(lm.source_dtype),
                "exported_dtypes": exported,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
