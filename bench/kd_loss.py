"""The distillation loss's cost against cross-entropy (CPT's loss) and against autograd through the same loss.

    python bench/kd_loss.py [--rounds 5] [--shape 4,128,49152] [--k 64]

On random fp32 logits of SmolLM2's vocabulary (the student's, requiring grad) and a teacher's top-k cache
(or live logits), forward + backward of: layerprune's kd_loss (the gradient in closed form, computed with
the loss), the same loss written for autograd (a log-softmax of the vocabulary, the top-k gathered, the
rest bucket as a log-sum-exp over the complement), and F.cross_entropy. Time: one thread, the variants
interleaved in one process for --rounds rounds (median seconds, ratio to cross-entropy). Memory: each
variant once in a fresh process, its peak RSS above the RSS with logits and teacher in place (VmHWM after
clear_refs). Writes bench/results/kd_loss.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("kd_loss_cache", "autograd_cache", "kd_loss_live", "autograd_live", "cross_entropy")


def inputs(shape, k: int, seed: int = 0):
    import torch

    from layerprune.recovery.distill import teacher_topk

    g = torch.Generator().manual_seed(seed)
    B, T, V = shape
    student = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    return student, teacher, teacher_topk(teacher[:, :-1], k), labels


def autograd_loss(student, labels, teacher):
    """The KD loss (T = 1, KD alone) as autograd sees it when written directly."""
    import torch

    from layerprune.recovery.distill import TopK

    logp = torch.log_softmax(student[:, :-1].float(), dim=-1)
    if isinstance(teacher, TopK):
        q = teacher.logq.exp()
        kl = (q * (teacher.logq - logp.gather(-1, teacher.index))).sum(-1)
        lp_rest = torch.logsumexp(logp.scatter(-1, teacher.index, float("-inf")), dim=-1)
        kl = kl + teacher.rest.exp() * (teacher.rest - lp_rest)
    else:
        logq = torch.log_softmax(teacher[:, :-1].float(), dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
    return kl.mean()


def step(variant: str, student, teacher, top, labels) -> None:
    import torch.nn.functional as F

    from layerprune.recovery.distill import kd_loss

    student.grad = None
    if variant == "kd_loss_cache":
        loss = kd_loss(student, labels, top)[0]
    elif variant == "kd_loss_live":
        loss = kd_loss(student, labels, teacher)[0]
    elif variant == "autograd_cache":
        loss = autograd_loss(student, labels, top)
    elif variant == "autograd_live":
        loss = autograd_loss(student, labels, teacher)
    else:
        V = student.shape[-1]
        loss = F.cross_entropy(student[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    loss.backward()


def memory(variant: str, shape, k: int) -> int:
    """Run in a fresh process: bytes of peak RSS above the inputs'."""
    import torch
    from _proc import reset_peak, status

    torch.set_num_threads(1)
    args = inputs(shape, k)
    step("cross_entropy", *args)  # the allocator's first pages and the grad buffer, for every variant alike
    args[0].grad = None
    base = status("VmRSS")
    reset_peak()
    step(variant, *args)
    return status("VmHWM") - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="4,128,49152")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the fresh process's part
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.memory_of:
        print(memory(args.memory_of, shape, args.k))
        return
    import torch
    from _results import write

    torch.set_num_threads(1)
    data = inputs(shape, args.k)
    for v in VARIANTS:  # warm-up
        step(v, *data)
    times = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:  # the order rotated
            t0 = time.perf_counter()
            step(v, *data)
            times[v].append(time.perf_counter() - t0)
    peak = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--memory-of", v, "--shape", args.shape, "--k", str(args.k)]
        peak[v] = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
    ce = statistics.median(times["cross_entropy"])
    logits_bytes = 4 * shape[0] * shape[1] * shape[2]
    doc = {
        "benchmark": "distillation loss, forward + backward, against cross-entropy and autograd",
        "protocol": {
            "shape": list(shape),
            "k": args.k,
            "dtype": "float32",
            "threads": 1,
            "rounds": args.rounds,
            "memory": "peak RSS above the inputs' in a fresh process per variant",
        },  # fmt: skip
        "seconds": {v: statistics.median(t) for v, t in times.items()},
        "seconds_runs": times,
        "time_over_cross_entropy": {v: statistics.median(t) / ce for v, t in times.items()},
        "peak_bytes": peak,
        "peak_over_logits": {v: b / logits_bytes for v, b in peak.items()},
    }
    write(doc, HERE / "results" / "kd_loss.json")
    print(json.dumps({k: doc[k] for k in ("time_over_cross_entropy", "peak_over_logits")}, indent=1))


if __name__ == "__main__":
    main()
