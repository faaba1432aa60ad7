"""Taylor+ (Shortened LLaMA): importance of a unit = sum over its weights of |W * dL/dW|.

Salience s = W * grad is accumulated over calibration batches (signed), then |s| is summed per weight
tensor and per unit (`norm_power` 1 = the paper's default). Parameters named `*weight` count: the
projections and the norm weights, not biases, not embeddings, final norm or LM head.

Memory: the reference keeps every full gradient and runs out of memory on an 8B model with 40 GB.
Here only the units' weights require grad, and a hook reduces each weight's gradient to its score
the moment autograd has produced it, then frees it, so at most a block's gradients are alive. With
one calibration batch (the default: all samples, as the reference) nothing else is stored; with
several batches the signed salience must be accumulated per weight (as the reference does).

Precision: an fp16 backward flushes gradients under 2^-24 to zero (and keeps few bits under 2^-14),
so for an fp16 model the loss is scaled by 2^16 and each gradient unscaled in fp32 as it is reduced
(`backward_each`); where a scaled gradient overflows, the parameters still to be reduced get their
gradients again from a backward at a scale 8 times smaller. bf16 has fp32's exponent range: no scale.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from ..errors import LayerpruneError
from .base import MethodScores, keep_mask

FP16_LOSS_SCALE = 2.0**16  # GradScaler's initial scale
MIN_LOSS_SCALE = 2.0**-8  # below it the gradients overflow fp16 unscaled: give up
BACKOFF = 8.0


def loss_scale(model) -> float:
    """The initial loss scale for a model's backward: 2^16 for fp16 weights, else 1 (none)."""
    return FP16_LOSS_SCALE if next(model.parameters()).dtype == torch.float16 else 1.0


def backward_each(
    loss_fn: Callable[[], torch.Tensor],
    params,
    reduce: Callable[[torch.nn.Parameter, torch.Tensor], None],
    scale: float = 1.0,
) -> float:
    """Backpropagate `loss_fn()` and hand each of `params` (which must require grad) to
    `reduce(p, g)` once, with its gradient unscaled in float32, the moment autograd produces it (then
    free it: at most a block's gradients are alive). The loss is multiplied by `scale` for the
    backward. A non-finite scaled gradient is an overflow: its parameter and every one not reduced yet
    get their gradients from a new forward and backward at scale / 8 (the gradients reduced already
    were finite, so no overflow reached them: they are kept, each parameter reduced exactly once).
    Returns the smallest scale used. With scale 1 (float32, bf16) an overflow is an error at once."""
    done: set[torch.nn.Parameter] = set()
    targets, scaled = set(params), scale != 1.0
    while True:
        overflow: list[torch.nn.Parameter] = []

        def hook(p: torch.nn.Parameter, overflow=overflow, scale=scale) -> None:
            g, p.grad = p.grad, None
            if p in done:
                return
            g = g.float()
            if not bool(torch.isfinite(g).all()):
                overflow.append(p)
                return
            reduce(p, g / scale if scale != 1.0 else g)
            done.add(p)

        handles = [p.register_post_accumulate_grad_hook(hook) for p in targets]
        try:
            loss = loss_fn()
            _check_loss(float(loss.detach()), params)
            (loss * scale if scaled else loss).backward()
        finally:
            for h in handles:
                h.remove()
        if not overflow:
            return scale
        scale = _back_off(scale, scaled, params)


def _check_loss(loss: float, params) -> None:
    if not math.isfinite(loss):
        raise LayerpruneError(
            f"Taylor+: the calibration loss is {loss} in {_dtype(params)} (overflow, or inf / NaN "
            "weights); load the model in float32"
        )


def _back_off(scale: float, scaled: bool, params) -> float:
    scale /= BACKOFF
    if not scaled or scale < MIN_LOSS_SCALE:
        raise LayerpruneError(
            f"Taylor+: the gradients overflow in {_dtype(params)}"
            + (" at every loss scale" if scaled else "")
            + "; load the model in float32"
        )
    return scale


def _dtype(params) -> str:
    return str(next(iter(params)).dtype).removeprefix("torch.")


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

    def reduce(p: torch.nn.Parameter, g: torch.Tensor) -> None:
        s = p.detach().float() * g
        if single:
            totals[owner[p]] += float(s.abs().pow(norm_power).sum())
        elif p in salience:
            salience[p] += s
        else:
            salience[p] = s

    requires = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    scale = start = loss_scale(model)
    try:
        for p in model.parameters():
            p.requires_grad_(p in owner)
        ctx = adapter.skip(keep, unit) if not all(keep) else contextlib.nullcontext()
        with ctx:
            for b in batches:
                b = b.to(device)

                def loss_fn(b=b):
                    return model(input_ids=b, labels=b, use_cache=False).loss

                # a batch that overflowed restarts at its own smaller scale, the next at the largest
                scale = min(scale, backward_each(loss_fn, list(owner), reduce, start))
        for p, s in salience.items():
            totals[owner[p]] += float(s.abs().pow(norm_power).sum())
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
            p.grad = None
    importance = [float(totals[k]) if keep[k] else None for k in range(len(units))]
    extra = {"batches": len(batches), "norm_power": norm_power}
    if start != 1.0:
        extra["loss_scale"] = scale
    return MethodScores(importance, extra)


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
    _check_loss(float(loss.detach()), [h])
    scale = start = loss_scale(model)
    while True:
        (grad,) = torch.autograd.grad(loss * scale if start != 1.0 else loss, [h], retain_graph=start != 1.0)
        if bool(torch.isfinite(grad).all()):
            break
        scale = _back_off(scale, start != 1.0, [h])
    del loss
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
            while True:  # an overflow in this block: its output gradient, finite, scaled down
                retain = start != 1.0  # only a scaled backward may need a second try
                grads = torch.autograd.grad(out, [x, *weights], grad_outputs=grad, retain_graph=retain)
                if all(bool(torch.isfinite(g).all()) for g in grads):
                    break
                new = _back_off(scale, start != 1.0, weights)
                grad, scale = grad * (new / scale), new
            del out
            grad = grads[0]
            for (k, p), g in zip(owned, grads[1:]):
                s = p.detach().float() * (g.float() / scale)
                totals[k] += float(s.abs().pow(norm_power).sum())
    importance = [float(totals[k]) if keep[k] else None for k in range(len(units))]
    extra = {"batches": 1, "norm_power": norm_power, "offloaded": True}
    if start != 1.0:
        extra["loss_scale"] = scale
    return MethodScores(importance, extra)
