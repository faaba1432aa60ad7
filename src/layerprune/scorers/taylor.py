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
    if adapter.offload is not None:
        return _offloaded(model, adapter, windows, units, keep, batch_size, norm_power)
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


def _offloaded(model, adapter, windows, units, keep, batch_size, norm_power) -> MethodScores:
    """Taylor+ with the blocks on disk: a forward block by block keeps each block's input (on CPU),
    the loss's gradient with respect to the last hidden states comes from the head, then the blocks
    are walked backwards, each one resident once: its forward recomputed from the kept input with
    its weights requiring grad, the output gradient pushed through it, |W * grad| summed per unit,
    the input gradient handed to the block before. Same gradients as one backward of the whole
    model (activation checkpointing at block boundaries); one calibration batch, as the default."""
    from ..engine.masked import BlockRunner, SkippedBlock, _Inject, _replaced_blocks
    from ..errors import LayerpruneError

    ids = windows.input_ids
    if batch_size and batch_size < ids.shape[0]:
        raise LayerpruneError(
            "with --max-memory Taylor scores all calibration samples as one batch; drop --batch-size"
        )
    L = adapter.num_blocks
    per_block: dict[int, list[int]] = {}
    for k, u in enumerate(units):
        per_block.setdefault(u.block, []).append(k)

    def parts_off(i: int) -> list[str]:
        off = [units[k].part for k in per_block[i] if not keep[k]]
        return ["attn", "mlp"] if "block" in off else off

    runner = BlockRunner(model, adapter, ids, batch_size=ids.shape[0])
    inputs = []
    with torch.no_grad():
        h = runner.embed_batch(0)
        for i in range(L):
            inputs.append(h.cpu())
            off = parts_off(i)
            if len(off) < 2:
                h = runner.block(i, [h], off)[0]
    h = h.detach().requires_grad_(True)
    stand_ins = [SkippedBlock() for _ in range(L - 1)] + [_Inject(h)]
    batch = runner.batches[0]
    with _replaced_blocks(adapter, stand_ins):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    (grad,) = torch.autograd.grad(loss, [h])
    totals = torch.zeros(len(units), dtype=torch.float64)
    for i in reversed(range(L)):
        off = parts_off(i)
        if len(off) == 2:
            continue  # a removed block passes the gradient through unchanged
        with adapter.resident(i), adapter.zero_parts(i, off) if off else contextlib.nullcontext():
            owned = [
                (k, p)
                for k in per_block[i]
                if keep[k]
                for n, p in adapter.unit_parameters(units[k])
                if n.endswith("weight")
            ]
            weights = [p.requires_grad_(True) for _, p in owned]
            x = inputs[i].to(grad.device).requires_grad_(True)
            args, kwargs = runner._capture(batch)[i]
            with torch.enable_grad():
                out = adapter.blocks[i](x, *args, **kwargs)
            grads = torch.autograd.grad(out, [x, *weights], grad_outputs=grad)
            grad = grads[0]
            for (k, p), g in zip(owned, grads[1:]):
                s = p.detach().float() * g.float()
                totals[k] += float(s.abs().pow(norm_power).sum())
    importance = [float(totals[k]) if keep[k] else None for k in range(len(units))]
    return MethodScores(importance, {"batches": 1, "norm_power": norm_power, "offloaded": True})
