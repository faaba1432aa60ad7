"""Taylor+ (Shortened LLaMA): importance of a unit = sum over its weights of |W * dL/dW|.

Salience s = W * grad is accumulated over calibration batches (signed), then |s| is summed per weight
tensor and per unit (`norm_power` 1 = the paper's default). Parameters named `*weight` count: the
projections and the norm weights, not biases, not embeddings, final norm or LM head.

Memory: the reference keeps every full gradient and runs out of memory on an 8B model with 40 GB.
Here only the units' weights require grad, and a hook reduces each weight's gradient to its score
the moment autograd has produced it, then frees it, so at most a block's gradients are alive. With
one calibration batch (the default: all samples, as the reference) nothing else is stored; with
several batches the signed salience must be accumulated per weight (as the reference does).
"""

from __future__ import annotations

import contextlib

import torch

from .base import MethodScores, keep_mask


def score(
    model, adapter, windows, *, unit="block", removed=None, batch_size=None, progress=True, norm_power=1
):
    units = adapter.units(unit)
    keep = keep_mask(len(units), removed)
    owner: dict[torch.nn.Parameter, int] = {}
    for k, u in enumerate(units):
        if keep[k]:
            for name, p in adapter.unit_parameters(u):
                if name.endswith("weight"):
                    owner[p] = k
    ids = windows.input_ids
    batch_size = batch_size or ids.shape[0]
    batches = ids.split(batch_size)
    single = len(batches) == 1
    totals = torch.zeros(len(units), dtype=torch.float64)
    salience: dict[torch.nn.Parameter, torch.Tensor] = {}

    def reduce(p: torch.nn.Parameter) -> None:
        s = p.detach().float() * p.grad.float()
        if single:
            totals[owner[p]] += float(s.abs().pow(norm_power).sum())
        elif p in salience:
            salience[p] += s
        else:
            salience[p] = s
        p.grad = None  # free it now: the next weight's gradient reuses the memory

    requires = {p: p.requires_grad for p in model.parameters()}
    handles = []
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(p in owner)
        handles = [p.register_post_accumulate_grad_hook(reduce) for p in owner]
        ctx = adapter.skip(keep, unit) if not all(keep) else contextlib.nullcontext()
        with ctx:
            for b in batches:
                b = b.to(device)
                loss = model(input_ids=b, labels=b, use_cache=False).loss
                loss.backward()
        for p, s in salience.items():
            totals[owner[p]] += float(s.abs().pow(norm_power).sum())
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = None
    importance = [float(totals[k]) if keep[k] else None for k in range(len(units))]
    return MethodScores(importance, {"batches": len(batches), "norm_power": norm_power})
