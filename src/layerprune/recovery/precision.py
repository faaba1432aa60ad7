"""Training a bfloat16 / float16 model without losing its updates (DESIGN.md §13).

A bf16 weight keeps 8 significant bits: an AdamW update below half a unit in the last place (about
2^-9 of the weight) rounds away, so in bf16 a third of a model's weights never move at lr 1e-4.
In fp16, AdamW's state underflows (eps 1e-8 rounds to 0, squared gradients flush below 2^-24) and
the weights end in NaN; fp16 gradients below 2^-24 flush to zero in the backward.

What each case gets:
- float32 model: nothing changes (`mode="fp32"`).
- full training of a low-precision model, `mode="master"` (the default, chosen by measurement in
  bench/precision_train.py): the model keeps its bf16 / fp16 weights, so the forward and backward
  are the very computation the recovered model will run; each weight has an fp32 master copy that
  AdamW (fp32 state) updates, its gradient accumulated in fp32 as autograd produces it, and the
  weights are the master rounded after each step. `mode="autocast"` is the other recipe (the
  weights made fp32, forward and backward under torch.autocast, weights cast back at the end).
- LoRA on a low-precision model, `mode="fp32-adapters"`: peft keeps the adapters in fp32 (its
  autocast_adapter_dtype default), so the optimizer already holds fp32 weights and state.
- float16 in any mode: dynamic loss scaling (torch.amp.GradScaler, on CPU too): a step whose
  gradients overflow is skipped and the scale halved.
"""

from __future__ import annotations

import contextlib

import torch

LOW = (torch.bfloat16, torch.float16)
MODES = ("master", "autocast")  # for full training of a low-precision model


class Precision:
    """The tensors the optimizer updates, how gradients reach them, and how the model gets them back.

    `params`: (name, tensor) in the names of the model's trainable parameters; float32 whenever the
    model is low-precision (master copies, fp32 parameters under autocast, or fp32 adapters)."""

    def __init__(self, model, trainable, dtype: torch.dtype, device: torch.device, full: bool, mode: str):
        self.dtype, self.device = dtype, torch.device(device)
        self.model_params = trainable
        self.handles = []
        if dtype not in LOW:
            self.mode = "fp32"
        elif not full:
            self.mode = "fp32-adapters"
            if any(p.dtype != torch.float32 for _, p in trainable):  # peft's default; kept in case it changes
                for _, p in trainable:
                    p.data = p.data.float()
        elif mode == "autocast":
            self.mode = "autocast"
            for _, p in trainable:
                p.data = p.data.float()
        else:
            self.mode = "master"
        if self.mode == "master":
            self.params = [(n, torch.nn.Parameter(p.detach().float().clone())) for n, p in trainable]
            for (_, p), (_, m) in zip(trainable, self.params):
                self.handles.append(p.register_post_accumulate_grad_hook(_to_master(m)))
        else:
            self.params = list(trainable)
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None

    def autocast(self):
        if self.mode != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer, max_grad_norm: float) -> bool:
        """Unscale, clip, step; False when the step was skipped for non-finite gradients."""
        params = [p for _, p in self.params]
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = bool(torch.isfinite(norm))
        if finite and max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
        if self.scaler:  # skips the step itself when unscale_ found inf / NaN
            self.scaler.step(optimizer)
            self.scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for _, p in self.model_params:
            p.grad = None
        return finite

    def to_model(self) -> None:
        """The model's weights from the master copies (rounded to the model's dtype)."""
        if self.mode == "master":
            with torch.no_grad():
                for (_, p), (_, m) in zip(self.model_params, self.params):
                    p.copy_(m)

    def finish(self) -> None:
        """Stop collecting gradients; give the model back its dtype (exports and later stages use it)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.mode == "autocast":
            for _, p in self.model_params:
                p.data = p.data.to(self.dtype)

    def record(self) -> dict:
        rec = {"dtype": str(self.dtype).removeprefix("torch."), "mode": self.mode}
        if self.scaler:
            rec["loss_scale"] = float(self.scaler.get_scale())
        return rec


def _to_master(master: torch.nn.Parameter):
    """Move a low-precision gradient into the master's fp32 gradient (summed over micro-batches in
    fp32, not in bf16) and free it at once: no low-precision gradient outlives its backward."""

    def hook(p: torch.Tensor) -> None:
        g = p.grad.float()
        master.grad = g if master.grad is None else master.grad.add_(g)
        p.grad = None

    return hook
