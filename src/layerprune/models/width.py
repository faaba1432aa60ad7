"""Width units: which rows and columns of which weights a KV group or an MLP channel owns.

The prunable units of a block are, for its attention, the KV groups (a KV head with the query heads
that read it; one head per group without GQA) and, for its MLP, the intermediate channels.
`layout` says, per architecture (through the adapter's spec), which rows / columns each unit owns;
on it rest the masks (`WidthMask`, `check_masks`) and

- `masked(adapter, masks)`: a context in which removed units are silenced without copying any
  weight: forward pre-hooks on the output projections (o, down) zero the input features that the
  removed units produce. Removing the query heads of a group leaves its KV head unread, so this is
  exactly the function of the pruned model.

How many units a rate removes, and which (parameter accounting, the deployable rule of
`--deploy decilm`), is `models/width_decisions.py`; removing them for good is `models/shrink.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerpruneError
from ..registry import PARTS
from .adapter import ModelAdapter


@dataclass(frozen=True)
class WidthMask:
    """The units a block keeps: indices of KV groups and of MLP channels (None keeps all)."""

    groups: list[int] | None = None
    channels: list[int] | None = None


def as_adapter(target) -> ModelAdapter:
    """The adapter of a LoadedModel, a ModelAdapter, or a model."""
    if isinstance(target, ModelAdapter):
        return target
    adapter = getattr(target, "adapter", None)
    if isinstance(adapter, ModelAdapter):
        return adapter
    if isinstance(target, nn.Module):
        return ModelAdapter(target)
    raise LayerpruneError(f"expected a loaded model, a ModelAdapter or a model, not {type(target).__name__}")


# ---- layout --------------------------------------------------------------------------------------
def _ranges(n_units: int, size: int, offset: int = 0, stride: int | None = None) -> torch.Tensor:
    """[n_units, size]: unit u owns offset + u * stride + 0..size-1."""
    stride = size if stride is None else stride
    return offset + torch.arange(n_units).unsqueeze(1) * stride + torch.arange(size).unsqueeze(0)


def layout(adapter: ModelAdapter, i: int, part: str) -> dict[str, tuple[int, torch.Tensor]]:
    """What each unit of block i's part owns: role -> (axis, idx), idx a LongTensor [n_units, k].

    axis 0 = rows of the (out, in) weight view (and the bias), 1 = columns. Attention units are the
    KV groups (unit u: query heads u*g .. u*g+g-1, g = heads // kv_heads, and KV head u, as
    transformers' repeat_kv pairs them); MLP units are the intermediate channels."""
    adapter.require_split()
    if part not in PARTS:
        raise LayerpruneError(f"unknown part '{part}'; use attn or mlp")
    roles = adapter.spec.linears
    if part == "mlp":
        n = adapter.mlp_channels(i)
        lay = {}
        for role in ("gate", "up"):
            if role in roles:
                lay[role] = (0, _ranges(n, 1))
        if "gate_up" in roles:  # rows [gate; up]
            lay["gate_up"] = (0, torch.cat([_ranges(n, 1), _ranges(n, 1, offset=n)], dim=1))
        lay[adapter.spec.output_roles["mlp"]] = (1, _ranges(n, 1))
        return lay
    heads, kv = adapter.attn_heads(i)
    d = adapter.head_dim
    if kv < 1 or heads % kv:
        raise LayerpruneError(f"block {i} has {heads} query heads and {kv} KV heads: not whole KV groups")
    g = heads // kv
    q = _ranges(kv, g * d)  # the group's query heads are contiguous
    k = _ranges(kv, d)
    style = adapter.spec.qkv_layout
    if style == "separate":
        lay = {"q": (0, q), "k": (0, k), "v": (0, k.clone())}
    elif style == "concat":  # [q heads; k heads; v heads]
        lay = {"qkv": (0, torch.cat([q, k + heads * d, k + (heads + kv) * d], dim=1))}
    elif style == "interleaved":  # per head [q; k; v]; no GQA
        lay = {"qkv": (0, _ranges(kv, 3 * d * g))}
    else:
        raise LayerpruneError(f"unknown qkv layout '{style}' for {adapter.spec.name}")
    lay[adapter.spec.output_roles["attn"]] = (1, q.clone())
    return lay


def units(adapter: ModelAdapter, i: int) -> tuple[int, int]:
    """(KV groups, MLP channels) of block i."""
    return adapter.width_units(i)


# ---- masks ---------------------------------------------------------------------------------------
def check_masks(
    adapter: ModelAdapter, masks: Sequence[WidthMask], allow_removed: bool = False
) -> list[WidthMask]:
    """The masks with sorted indices; LayerpruneError naming the block and the fix otherwise.

    `allow_removed`: an empty list removes the whole part (deployable plans: `masked` silences it;
    `pruners/width.py` replaces it by a no-op)."""
    adapter.require_split()
    masks = list(masks)
    L = adapter.num_blocks
    if len(masks) != L:
        raise LayerpruneError(f"{len(masks)} width masks for {L} blocks; give one WidthMask per block")
    out = []
    for i, m in enumerate(masks):
        if not isinstance(m, WidthMask):
            raise LayerpruneError(f"width mask {i} is a {type(m).__name__}, not a WidthMask")
        n_groups, n_channels = units(adapter, i)
        kept = []
        for what, keep, n in (("groups", m.groups, n_groups), ("channels", m.channels, n_channels)):
            if keep is None:
                kept.append(None)
                continue
            idx = sorted(int(j) for j in keep)
            if len(set(idx)) != len(idx):
                raise LayerpruneError(f"block {i}: the kept {what} repeat an index; list each once")
            if idx and (idx[0] < 0 or idx[-1] >= n):
                raise LayerpruneError(f"block {i}: kept {what} {idx} out of range: the block has 0..{n - 1}")
            if not idx and not allow_removed:
                unit = "KV group" if what == "groups" else "MLP channel"
                raise LayerpruneError(f"block {i}: the mask removes every {unit}; keep at least one")
            kept.append(idx)
        out.append(WidthMask(*kept))
    return out


def removed(keep: list[int] | None, n: int) -> list[int]:
    return [] if keep is None else sorted(set(range(n)) - set(keep))


def _zero_inputs(idx: torch.Tensor, fill: torch.Tensor | None = None):
    """Zero the input features `idx`, or (fill: a vector over all features, zero elsewhere) set them
    to fill's values."""
    cache: dict[torch.device, torch.Tensor] = {}
    fills: dict[tuple, torch.Tensor] = {}

    def hook(module, args, kwargs):
        if args:
            x = args[0]
        else:  # called with a keyword: the one tensor argument
            key = next(k for k, v in kwargs.items() if torch.is_tensor(v))
            x = kwargs[key]
        where = cache.setdefault(x.device, idx.to(x.device))
        x = x.index_fill(-1, where, 0)
        if fill is not None:
            x = x + fills.setdefault((x.device, x.dtype), fill.to(x.device, x.dtype))
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, key: x}

    return hook


def _zero_output(module, args, output):
    return torch.zeros_like(output)


@contextlib.contextmanager
def masked(adapter: ModelAdapter, masks: Sequence[WidthMask], means: dict | None = None) -> Iterator[None]:
    """Within the context, removed groups and channels contribute nothing. No weight is copied.
    A part whose mask is empty (deployable plans) outputs zeros, its projection's bias included.

    `means` ({"attn": [...], "mlp": [...]}: per block, the calibration mean of every input feature
    of the o / down projection, as FLAP scores record them): removed features read their mean
    instead of zero, which is exactly FLAP's bias compensation (W[:, removed] @ mean[removed])."""
    adapter = as_adapter(adapter)
    masks = check_masks(adapter, masks, allow_removed=True)
    handles = []
    try:
        for i, m in enumerate(masks):
            for part, keep in zip(PARTS, (m.groups, m.channels)):
                lay = layout(adapter, i, part)
                role = adapter.spec.output_roles[part]
                if keep == []:
                    handles.append(adapter.linears(i)[role].register_forward_hook(_zero_output))
                    continue
                axis, idx = lay[role]
                gone = removed(keep, idx.shape[0])
                if not gone:
                    continue
                cols = idx[gone].reshape(-1)
                layer = adapter.linears(i)[role]
                fill = None
                if means is not None:
                    mean = torch.as_tensor(means[part][i], dtype=torch.float64)
                    fill = torch.zeros_like(mean).index_copy(0, cols, mean[cols])
                handles.append(layer.register_forward_pre_hook(_zero_inputs(cols, fill), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
