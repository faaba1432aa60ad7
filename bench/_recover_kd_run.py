"""One row of bench/recover.py's SmolLM2 mode in a fresh process (so its peak RSS is its own).

    python bench/_recover_kd_run.py SPEC_JSON

SPEC: {"model", "method": none | lora | full, "teacher", "cache", "topk", "steps", "batch", "seqlen",
"lr", "other": the other-domain .txt, "heldout_windows", "zeroshot_limit"} or {"build_cache": DIR,
"topk", "steps", "batch", "seqlen", ...}. Prints one JSON line: held-out perplexity on fixture:test
and on the other-domain text, zero-shot accuracy, and for a training row the record's tokens and
seconds, RSS after loading the model and its data and the peak (VmHWM) reached while training.
"""

import json
import sys
import time

from _proc import reset_peak, status

import layerprune as lp
from layerprune.evaluation.zeroshot import zeroshot
from layerprune.recovery import RecoveryConfig, load_training_data

TRAIN, HELDOUT = "fixture:train", "fixture:test"


def config(spec: dict, method: str = "full") -> dict:
    out = {"method": method, "steps": spec["steps"], "batch_size": spec["batch"], "lr": spec["lr"]}
    if spec.get("kd_mix"):  # bench/_recover_kd_budget.py's mixed rows
        out["kd_mix"] = spec["kd_mix"]
    return out


def build_cache(spec: dict) -> dict:
    """The teacher's top-k over the windows the runs will train on (one cache for every model)."""
    from layerprune.recovery.distill import build_cache as build
    from layerprune.recovery.train import used_examples

    teacher = lp.load(spec["teacher"], device="cpu", dtype="float32", quiet=True)
    data = load_training_data(teacher, TRAIN, spec["seqlen"])
    cfg = RecoveryConfig(**config(spec))
    examples = used_examples(cfg, len(data))
    t0 = time.perf_counter()
    build(teacher, data, spec["build_cache"], k=spec["topk"], temperature=cfg.kd_temperature, progress=False,
          examples=examples)  # fmt: skip
    return {
        "seconds": time.perf_counter() - t0,
        "windows_cached": len(examples),
        "windows_in_text": len(data),
    }


def evaluate(lm, spec: dict) -> dict:
    out = {}
    texts = (("heldout", HELDOUT), ("other", spec["other"])) if spec.get("ppl", True) else ()
    for name, source in texts:
        r = lp.perplexity(lm, source, seqlen=512, max_windows=spec["heldout_windows"], progress=False)
        out[f"{name}_ppl"], out[f"{name}_tokens"] = r.ppl, r.tokens
    if spec.get("zeroshot_limit"):
        zs = zeroshot(lm, "fixture", limit=spec["zeroshot_limit"], progress=False)
        out["zeroshot"] = {t: {"acc": v[v["metric"]], "stderr": v[v["metric"] + "_stderr"], "metric": v["metric"]}
                           for t, v in zs["tasks"].items()}  # fmt: skip
        out["zeroshot_mean"] = zs["mean"]
    return out


def train(spec: dict) -> dict:
    lm = lp.load(spec["model"], device="cpu", dtype="float32", quiet=True)
    data = load_training_data(lm, TRAIN, spec["seqlen"])
    kd = {}
    if spec.get("teacher") and not spec.get("cache"):
        kd["teacher"] = spec["teacher"]
    if spec.get("cache"):  # built beforehand: training never loads the teacher
        kd.update(teacher_cache=spec["cache"], kd_topk=spec["topk"])
    reset_peak()
    rss_loaded = status("VmRSS")
    t0 = time.perf_counter()
    record = lp.recover(lm, data, progress=False, **config(spec, spec["method"]), **kd)
    wall = time.perf_counter() - t0
    peak = status("VmHWM")
    history = record["history"]
    if spec.get("save"):  # for the zero-shot pass, which runs after every training row
        lp.export(lm, spec["save"], None, {"recovery": {k: v for k, v in record.items() if k != "history"}},
                  overwrite=True)  # fmt: skip
    return {
        "steps": record["steps"],
        "tokens": record["tokens"],
        "train_seconds": record["seconds"],
        "wall_seconds": wall,  # with loading the teacher (live) or opening the cache
        "seconds_per_token": record["seconds"] / record["tokens"],
        "trainable_parameters": record["trainable_parameters"],
        "loss_first": history["loss"][0],
        "loss_last_5": sum(history["loss"][-5:]) / 5,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": peak,
        "training_rss_bytes": peak - rss_loaded,
        **evaluate(lm, spec),
    }


def main(spec: dict) -> dict:
    if spec.get("build_cache"):
        return build_cache(spec)
    if spec["method"] == "none":
        return evaluate(lp.load(spec["model"], device="cpu", dtype="float32", quiet=True), spec)
    return train(spec)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
