"""Structured (width) pruning mechanics: attention heads in whole KV groups, and MLP channels.

The prunable units of a block are, for its attention, the KV groups (a KV head with the query heads
that read it; one head per group without GQA) and, for its MLP, the intermediate channels.
`layout` says which rows / columns of which weights each unit owns; on it rest:

- `masked(adapter, masks)`: a context in which removed units are silenced without copying any
  weight: forward pre-hooks on the output projections (o, down) zero the input features that the
  removed units produce. Removing the query heads of a group leaves its KV head unread, so this is
  exactly the function of the pruned model.
- `shrink(target, masks)`: slice the weights (and biases on a sliced axis) to the kept units for
  good, fix the modules' feature counts and head counts, and the config (`sync_config`).

Checkpoints. When every block keeps the same shape and the config can state it, the config's own
keys are updated (heads, KV heads, intermediate size, and head_dim made explicit, since it is
otherwise hidden // heads): plain `AutoModelForCausalLM.from_pretrained` loads the result. Otherwise
(shapes differ per block, or OPT / GPT-2 / GPT-NeoX with fewer heads: their head size is always
hidden // heads) the config keeps its keys and gains `layerprune_block_configs`, one
{"num_attention_heads", "num_key_value_heads", "intermediate_size"} per block;
`layerprune.models.loading.load` rebuilds such a model (`load_shrunk`): transformers builds it from
the config, it is shrunk to the block shapes right after construction, and from_pretrained loads the
safetensors into it (its key renamings, shards, dtype), strictly: any missing, unexpected or
mismatched weight is an error.

FLAP's bias compensation adds a bias to o / down. Where the config has flags for it (Llama's
`attention_bias` and `mlp_bias`), they are set and every projection of the part gets a bias (zero
on q, k, v, gate, up), so a uniform result is still a standard checkpoint; elsewhere the block's
shape lists the parts whose output projection gained a bias (`"output_bias": ["attn", "mlp"]`),
which makes the checkpoint a per-block one, rebuilt by `load_shrunk`.

Why not DeciLM / Nemotron-NAS `block_configs`: there a block is `attention: {no_op,
replace_with_linear, n_heads_in_group}` and `ffn: {no_op, replace_with_linear, ffn_mult}`. Every
attention block keeps the config's `num_attention_heads` query heads; only the group size (so the
number of KV heads) varies. Removing KV groups here removes their query heads with them, which
changes the number of query heads per block: not expressible. And the MLP width is derived from
`ffn_mult` (2 * ffn_mult * hidden / 3, rounded up to a multiple of 256), so arbitrary channel counts
are not expressible either. We therefore write no DeciLM format. (It also needs remote code.)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerpruneError
from ..models.adapter import ModelAdapter

BLOCK_CONFIGS_KEY = "layerprune_block_configs"
PARTS = ("attn", "mlp")
# Set on an o / down projection whose bias layerprune created (FLAP's compensation) where the config
# cannot state it; the block's shape then lists the part under "output_bias".
ADDED_BIAS = "layerprune_added_bias"


@dataclass(frozen=True)
class WidthMask:
    """The units a block keeps: indices of KV groups and of MLP channels (None keeps all)."""

    groups: list[int] | None = None
    channels: list[int] | None = None


def _adapter(target) -> ModelAdapter:
    if isinstance(target, ModelAdapter):
        return target
    adapter = getattr(target, "adapter", None)
    if isinstance(adapter, ModelAdapter):
        return adapter
    if isinstance(target, nn.Module):
        return ModelAdapter(target)
    raise LayerpruneError(f"expected a loaded model, a ModelAdapter or a model, not {type(target).__name__}")


def _require_split(adapter: ModelAdapter) -> None:
    if not adapter.has_parts():
        raise LayerpruneError(
            f"{adapter.spec.name} blocks have no attention / MLP split: width pruning needs one; "
            "use depth pruning (--unit block) or sparsity instead"
        )


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
    _require_split(adapter)
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
    _require_split(adapter)
    return adapter.attn_heads(i)[1], adapter.mlp_channels(i)


# ---- masks ---------------------------------------------------------------------------------------
def check_masks(adapter: ModelAdapter, masks: Sequence[WidthMask]) -> list[WidthMask]:
    """The masks with sorted indices; LayerpruneError naming the block and the fix otherwise."""
    _require_split(adapter)
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
            if not idx:
                unit = "KV group" if what == "groups" else "MLP channel"
                raise LayerpruneError(f"block {i}: the mask removes every {unit}; keep at least one")
            kept.append(idx)
        out.append(WidthMask(*kept))
    return out


def _removed(keep: list[int] | None, n: int) -> list[int]:
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


@contextlib.contextmanager
def masked(adapter: ModelAdapter, masks: Sequence[WidthMask], means: dict | None = None) -> Iterator[None]:
    """Within the context, removed groups and channels contribute nothing. No weight is copied.

    `means` ({"attn": [...], "mlp": [...]}: per block, the calibration mean of every input feature
    of the o / down projection, as FLAP scores record them): removed features read their mean
    instead of zero, which is exactly FLAP's bias compensation (W[:, removed] @ mean[removed])."""
    adapter = _adapter(adapter)
    masks = check_masks(adapter, masks)
    handles = []
    try:
        for i, m in enumerate(masks):
            for part, keep in zip(PARTS, (m.groups, m.channels)):
                lay = layout(adapter, i, part)
                role = adapter.spec.output_roles[part]
                axis, idx = lay[role]
                gone = _removed(keep, idx.shape[0])
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


# ---- physical removal ------------------------------------------------------------------------------
def _slice(adapter: ModelAdapter, layer: nn.Module, axis: int, keep: torch.Tensor) -> None:
    w = adapter.weight(layer)
    keep = keep.to(w.device)
    bias = getattr(layer, "bias", None)
    new_bias = bias.index_select(0, keep) if (axis == 0 and bias is not None) else None
    adapter.set_weight(layer, w.index_select(axis, keep), new_bias)


def _block_params(adapter: ModelAdapter, i: int) -> int:
    return sum(p.numel() for p in adapter.blocks[i].parameters())


@torch.no_grad()
def shrink(target, masks: Sequence[WidthMask]) -> list[dict]:
    """Remove the units the masks do not keep, for good; fix modules and config. Per-block counts.

    `target`: a LoadedModel (its fingerprint is then reset), a ModelAdapter, or a model."""
    adapter = _adapter(target)
    masks = check_masks(adapter, masks)
    d = adapter.head_dim
    counts = []
    for i, m in enumerate(masks):
        with adapter.resident(i, modifies=True):  # offloaded blocks: one at a time, kept as changed
            counts.append(_shrink_block(adapter, i, m, d))
    sync_config(adapter)
    if hasattr(target, "modified"):
        target.modified()
    return counts


def _shrink_block(adapter: ModelAdapter, i: int, m: WidthMask, d: int) -> dict:
    """Remove block i's units that `m` does not keep; its counts."""
    spec = adapter.spec
    heads, kv = adapter.attn_heads(i)
    channels = adapter.mlp_channels(i)
    before = _block_params(adapter, i)
    linears = adapter.linears(i)
    for part, keep in zip(PARTS, (m.groups, m.channels)):
        lay = layout(adapter, i, part)
        n_units = next(iter(lay.values()))[1].shape[0]
        if keep is None or len(keep) == n_units:
            continue
        for role, (axis, idx) in lay.items():
            rows = idx[keep].reshape(-1).sort().values  # kept rows in their original order
            _slice(adapter, linears[role], axis, rows)
    new_heads, new_kv = adapter.attn_heads(i)
    if (new_heads, new_kv) != (heads, kv):
        attn = adapter.part(i, "attn")
        values = {"heads": new_heads, "kv_heads": new_kv, "q_width": new_heads * d}
        for attr, what in spec.attn_module_attrs.items():
            setattr(attn, attr, values[what])
    return {
        "block": i,
        "heads_before": heads,
        "heads_after": new_heads,
        "kv_heads_before": kv,
        "kv_heads_after": new_kv,
        "channels_before": channels,
        "channels_after": adapter.mlp_channels(i),
        "parameters_before": before,
        "parameters_after": _block_params(adapter, i),
    }


# ---- config and checkpoints ---------------------------------------------------------------------------
def block_configs(adapter: ModelAdapter) -> list[dict]:
    """Per block, its shape: {"num_attention_heads", "num_key_value_heads", "intermediate_size"}."""
    _require_split(adapter)
    out = []
    for i in range(adapter.num_blocks):
        heads, kv = adapter.attn_heads(i)
        shape = {
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "intermediate_size": adapter.mlp_channels(i),
        }
        linears = adapter.linears(i)
        added = [p for p in PARTS if getattr(linears[adapter.spec.output_roles[p]], ADDED_BIAS, False)]
        if added:
            shape["output_bias"] = added
        out.append(shape)
    return out


def sync_config(adapter: ModelAdapter) -> bool:
    """Make the config describe the blocks; True when it is a standard config (no block list).

    Attention modules whose forward reads head counts from their `config` (phi3) get their own copy
    of it where their block differs from the model config."""
    spec, config = adapter.spec, adapter.config
    shapes = block_configs(adapter)
    d = adapter.head_dim
    first = shapes[0]
    same_heads = first["num_attention_heads"] == adapter.num_heads
    standard = (
        all(s == first for s in shapes)
        and (same_heads or spec.head_dim_key is not None)
        and not any("output_bias" in s for s in shapes)
    )
    if standard:
        if not same_heads:
            setattr(config, spec.head_dim_key, d)
            setattr(config, spec.heads_key, first["num_attention_heads"])
        if spec.kv_heads_key is not None:
            setattr(config, spec.kv_heads_key, first["num_key_value_heads"])
        if first["intermediate_size"] != adapter.intermediate_size:
            setattr(config, spec.intermediate_key, first["intermediate_size"])
        if hasattr(config, BLOCK_CONFIGS_KEY):
            delattr(config, BLOCK_CONFIGS_KEY)
    else:
        setattr(config, BLOCK_CONFIGS_KEY, shapes)
    if spec.attn_config_keys:
        for i, s in enumerate(shapes):
            attn = adapter.part(i, "attn")
            values = {"heads": s["num_attention_heads"], "kv_heads": s["num_key_value_heads"]}
            wanted = {key: values[what] for key, what in spec.attn_config_keys.items()}
            if all(getattr(config, key) == v for key, v in wanted.items()):
                attn.config = config
            else:
                own = copy.copy(config)
                for key, v in wanted.items():
                    setattr(own, key, v)
                attn.config = own
    return standard


def shrink_to_block_configs(model: nn.Module, where: str = "the config") -> None:
    """Shrink a model built from a config with `layerprune_block_configs` to those shapes, keeping
    the first units of every block (for loading: the weights come from the checkpoint)."""
    adapter = ModelAdapter(model)
    shapes = getattr(model.config, BLOCK_CONFIGS_KEY, None)
    if not isinstance(shapes, list) or len(shapes) != adapter.num_blocks:
        raise LayerpruneError(
            f"{where}: {BLOCK_CONFIGS_KEY} must list one shape per block ({adapter.num_blocks})"
        )
    masks = []
    for i, s in enumerate(shapes):
        heads, kv = adapter.attn_heads(i)
        channels = adapter.mlp_channels(i)
        try:
            h, k, n = (
                int(s[key]) for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
            )
        except (KeyError, TypeError, ValueError):
            raise LayerpruneError(f"{where}: {BLOCK_CONFIGS_KEY}[{i}] is not a block shape: {s!r}") from None
        if not (0 < k <= kv and h == k * (heads // kv) and 0 < n <= channels):
            raise LayerpruneError(
                f"{where}: block {i} shape {s} does not fit the base config "
                f"({heads} heads, {kv} KV heads, {channels} channels)"
            )
        biased = s.get("output_bias", [])
        if not isinstance(biased, list) or not set(biased) <= set(PARTS):
            raise LayerpruneError(
                f"{where}: {BLOCK_CONFIGS_KEY}[{i}] output_bias {biased!r} must list attn / mlp"
            )
        for part in biased:
            _ensure_bias(adapter, adapter.linears(i)[adapter.spec.output_roles[part]], mark=True)
        masks.append(WidthMask(list(range(k)), list(range(n))))
    shrink(adapter, masks)


def load_shrunk(source: str, config, dtype: torch.dtype | str | None = None, **kwargs) -> nn.Module:
    """Load a checkpoint whose config has `layerprune_block_configs`.

    transformers builds the model from the config, our subclass shrinks every block to its shape
    right after construction (on the meta device, before any weight is read), and from_pretrained then
    loads the safetensors as usual: same key renamings, shards, dtype and strict shape checks as for
    any checkpoint; no module is pickled. The subclass keeps the class's name and module, so the
    model saves (architectures, weight conversions) exactly like the original class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    def __init__(self, config, *args, **kw):
        base.__init__(self, config, *args, **kw)
        shrink_to_block_configs(self, str(source))

    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    cls.__qualname__ = base.__qualname__
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = cls.from_pretrained(source, config=config, output_loading_info=True, **kwargs)
    except RuntimeError as e:  # transformers refuses weights of another shape
        if "mismatch" not in str(e):
            raise
        raise LayerpruneError(
            f"{source}: the weights do not have the shapes its {BLOCK_CONFIGS_KEY} state; "
            "the checkpoint is damaged or its config was edited"
        ) from None
    bad = {k: list(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise LayerpruneError(
            f"{source}: the weights do not match its {BLOCK_CONFIGS_KEY} "
            f"({bad or info['error_msgs']}); the checkpoint is damaged or was edited"
        )
    return model.eval()


# ---- FLAP's bias compensation -------------------------------------------------------------------------
def _ensure_bias(adapter: ModelAdapter, layer: nn.Module, mark: bool) -> None:
    """Give a linear layer a zero bias if it has none; `mark`: note that layerprune added it."""
    if getattr(layer, "bias", None) is not None:
        return
    w = adapter.weight(layer)
    layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
    if mark:
        setattr(layer, ADDED_BIAS, True)


def compensation(adapter: ModelAdapter, masks: Sequence[WidthMask], means: dict) -> list[dict]:
    """Per block, {part: W[:, removed] @ mean[removed]} for the o / down projection (float64): what
    the removed input features contributed on average over the calibration tokens. `means`: per
    part and block, the mean of every input feature of the projection (FLAP scores' extra)."""
    masks = check_masks(adapter, masks)
    out = []
    for i, m in enumerate(masks):
        deltas = {}
        with adapter.resident(i):
            for part, keep in zip(PARTS, (m.groups, m.channels)):
                role = adapter.spec.output_roles[part]
                _, idx = layout(adapter, i, part)[role]
                gone = _removed(keep, idx.shape[0])
                if not gone:
                    continue
                cols = idx[gone].reshape(-1)
                w = adapter.weight(adapter.linears(i)[role]).detach()
                mean = torch.as_tensor(means[part][i], dtype=torch.float64, device=w.device)
                if mean.shape[0] != w.shape[1]:
                    raise LayerpruneError(
                        f"block {i}: {mean.shape[0]} {part} feature means for {w.shape[1]} features; "
                        "re-score the model with --method flap"
                    )
                deltas[part] = w[:, cols].double() @ mean[cols.to(w.device)]
        out.append(deltas)
    return out


@torch.no_grad()
def add_output_biases(adapter: ModelAdapter, deltas: Sequence[dict]) -> None:
    """Add `deltas` (per block, {part: vector}) to the biases of the o / down projections, creating
    them where missing. Where the config has a flag for the part's biases (Llama's attention_bias,
    mlp_bias) it is set and every projection of the part in every block gets a (zero) bias, so a
    standard checkpoint still loads with plain transformers; elsewhere the new bias is marked and
    the block's shape lists it (`output_bias`), for `load_shrunk`."""
    adapter.require_in_memory("FLAP's bias compensation")
    keys = adapter.spec.bias_config_keys
    L = adapter.num_blocks
    for part in PARTS:
        if not any(part in d for d in deltas):
            continue
        role = adapter.spec.output_roles[part]
        missing = any(getattr(adapter.linears(i)[role], "bias", None) is None for i in range(L))
        if missing and part in keys:
            setattr(adapter.config, keys[part], True)
            for i in range(L):
                linears = adapter.linears(i)
                for r in layout(adapter, i, part):
                    _ensure_bias(adapter, linears[r], mark=False)
        for i, d in enumerate(deltas):
            if part not in d:
                continue
            layer = adapter.linears(i)[role]
            _ensure_bias(adapter, layer, mark=True)
            layer.bias.add_(d[part].to(layer.bias.device, layer.bias.dtype))


@torch.no_grad()
def apply_plan(lm, plan, windows, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Apply a width plan to the loaded model: score groups and channels with the plan's pruner on
    `windows` (none for magnitude-sp), remove the lowest ones physically; with FLAP scores, add the
    removed features' mean contribution to the o / down biases first. Returns the report."""
    from ..planners.width import budgets, decision_of, masks_for
    from ..plans import WidthPlan
    from ..scorers.run import run

    if not isinstance(plan, WidthPlan):
        raise LayerpruneError(f"this is a {plan.kind} plan, not a width plan; apply it with layerprune.apply")
    plan.check(lm)
    before = sum(p.numel() for p in lm.model.parameters())
    scores = run(lm, plan.pruner, windows, batch_size=batch_size, progress=progress)
    decision = decision_of(plan, budgets(lm.adapter))
    masks = masks_for(decision, scores.extra)
    compensate = plan.pruner == "flap"
    if compensate:
        lm.adapter.require_in_memory("FLAP's bias compensation")
        add_output_biases(lm.adapter, compensation(lm.adapter, masks, scores.extra["means"]))
    blocks = shrink(lm, masks)
    after = sum(p.numel() for p in lm.model.parameters())
    return {
        "pruner": plan.pruner,
        "bias_compensation": compensate,
        "parameters_before": before,
        "parameters_after": after,
        "removed_fraction_of_model": 1 - after / before,
        "standard_config": sync_config(lm.adapter),
        "blocks": blocks,
    }
