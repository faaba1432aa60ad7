"""One recovery run in a fresh process, for bench/recover.py: what `layerprune recover` does, with
the peak resident memory of the training itself measured.

    python bench/_recover_run.py MODEL_DIR lora|full OUT_DIR STEPS LR

Prints JSON: held-out perplexity before and after (all of fixture:test, seqlen 128), the training
record (steps, tokens, seconds), RSS after loading the model and its data, and the peak (VmHWM)
reached while training.
"""

import json
import sys

from _proc import reset_peak, status

import layerprune as lp
from layerprune.checkpoint import read_record
from layerprune.recovery import load_training_data


def main(model: str, method: str, out: str, steps: int, lr: float) -> None:
    lm = lp.load(model, device="cpu", quiet=True)
    before = lp.perplexity(lm, "fixture:test", seqlen=128, progress=False)
    data = load_training_data(lm, "fixture:train", 128)
    reset_peak()
    rss_loaded = status("VmRSS")
    record = recover_run(lm, data, method, steps, lr)
    peak = status("VmHWM")
    after = lp.perplexity(lm, "fixture:test", seqlen=128, progress=False)
    plan, report = read_record(lm.path)
    history = record.pop("history")
    record.update(perplexity_before=[before.to_dict()], perplexity_after=[after.to_dict()])
    report = {k: v for k, v in report.items() if k not in ("plan", "versions", "created")}
    lp.export(lm, out, plan, {**report, "evaluation": [after.to_dict()], "recovery": record}, overwrite=True)
    print(
        json.dumps(
            {
                "model": model,
                "method": method,
                "lr": lr,
                "steps": record["steps"],
                "tokens": record["tokens"],
                "train_seconds": record["seconds"],
                "tokens_per_second": record["tokens"] / record["seconds"],
                "trainable_parameters": record["trainable_parameters"],
                "sparsity_kept": record["sparsity_kept"],
                "ppl_before": before.ppl,
                "ppl_after": after.ppl,
                "loss_first_10": sum(history["loss"][:10]) / 10,
                "loss_last_10": sum(history["loss"][-10:]) / 10,
                "rss_loaded_bytes": rss_loaded,
                "peak_rss_bytes": peak,
                "training_rss_bytes": peak - rss_loaded,
                "parameter_bytes": sum(p.numel() * p.element_size() for p in lm.model.parameters()),
                "output": out,
            }
        )
    )


def recover_run(lm, data, method, steps, lr):
    return lp.recover(lm, data, method=method, steps=steps, lr=lr, batch_size=8, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
