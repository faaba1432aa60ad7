"""Time per training token of CPT, KD + full (teacher live) and KD + full (teacher cache), interleaved
in one process (the machine is shared: a ratio taken across separate runs minutes apart measures the
other work as much as ours), for bench/recover.py --model smollm2.

    python bench/_recover_kd_time.py STUDENT_DIR CACHE_DIR ROUNDS STEPS LR K

Each round trains a fresh copy of the student `STEPS` steps by each method in turn (4 x 128 tokens a
step, the bench's batch, at the bench's full-training `LR`; the cache holds top-`K`), the order
rotated from round to round so that no method always runs first or after the same neighbour; prints
JSON: every round's seconds per token, and the medians of the per-round ratios to CPT. The teacher
is loaded once, before the first round (its loading is not training time in a run either).
"""

import json
import statistics
import sys

import layerprune as lp
from layerprune.recovery import load_training_data


def main(student: str, cache: str, rounds: int, steps: int, lr: float, k: int) -> dict:
    teacher = lp.load("smollm2", device="cpu", dtype="float32", quiet=True)
    options = {"method": "full", "steps": steps, "batch_size": 4, "lr": lr, "progress": False}
    methods = {
        "cpt": {},
        "kd-live": {"teacher": teacher},
        "kd-cache": {"teacher_cache": cache, "kd_topk": k},
    }
    names = list(methods)
    per_round = []
    for i in range(rounds):
        times = {}
        for name in names[i % 3 :] + names[: i % 3]:
            lm = lp.load(student, device="cpu", dtype="float32", quiet=True)
            data = load_training_data(lm, "fixture:train", 128)
            record = lp.recover(lm, data, **options, **methods[name])
            times[name] = record["seconds"] / record["tokens"]
            del lm, data
        per_round.append(times)
    ratios = {
        f"{name}_over_cpt": statistics.median(r[name] / r["cpt"] for r in per_round)
        for name in ("kd-live", "kd-cache")
    }
    return {"rounds": per_round, "steps": steps, "tokens_per_step": 512, "lr": lr, "topk": k, **ratios}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(main(a[0], a[1], int(a[2]), int(a[3]), float(a[4]), int(a[5]))))
