"""Removing width units for good, and checkpoints of the result.

`shrink(target, masks)` slices the weights (and biases on a sliced axis) to the kept units, fixes
the modules' feature counts and head counts, and the config (`sync_config`).

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

FLAP's bias compensation (pruners/width.py) adds a bias to o / down. Where the config has flags for
it (Llama's `attention_bias` and `mlp_bias`), they are set and every projection of the part gets a
bias (zero on q, k, v, gate, up), so a uniform result is still a standard checkpoint; elsewhere the
block's shape lists the parts whose output projection gained a bias (`"output_bias": ["attn",
"mlp"]`), which makes the checkpoint a per-block one, rebuilt by `load_shrunk`.

DeciLM / Nemotron-NAS `block_configs`, which serving engines load, cannot state what this format
states: there every attention block keeps the config's query heads (only the KV group size varies),
while removing a KV group here removes its query heads with it, and MLP widths come from `ffn_mult`
in multiples of 256. Plans made with `--deploy decilm` keep to what DeciLM states and are written in
it (`models/decilm.py`); the others keep this format.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LayerpruneError
from ..registry import PARTS
from .adapter import ModelAdapter
from .width import WidthMask, as_adapter, check_masks, layout

BLOCK_CONFIGS_KEY = "layerprune_block_configs"
# Set on an o / down projection whose bias layerprune created (FLAP's compensation) where the config
# cannot state it; the block's shape then lists the part under "output_bias".
ADDED_BIAS = "layerprune_added_bias"


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
    adapter = as_adapter(target)
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
    adapter.require_split()
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
            ensure_bias(adapter, adapter.linears(i)[adapter.spec.output_roles[part]], mark=True)
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
    return load_rebuilt(
        base, lambda model: shrink_to_block_configs(model, str(source)), source, config, dtype,
        BLOCK_CONFIGS_KEY, **kwargs,
    )  # fmt: skip


def load_rebuilt(base, rebuild, source: str, config, dtype=None, what: str = "config", **kwargs) -> nn.Module:
    """from_pretrained of `base` through a subclass whose construction ends with `rebuild(model)`
    (blocks given their shapes on the meta device, before any weight is read), strictly: a missing,
    unexpected or mismatched weight is one line saying the checkpoint does not match its `what`.
    The subclass keeps the class's name and module, so the model saves as the original class."""

    def __init__(self, config, *args, **kw):
        base.__init__(self, config, *args, **kw)
        rebuild(self)

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
            f"{source}: the weights do not have the shapes its {what} state; "
            "the checkpoint is damaged or its config was edited"
        ) from None
    bad = {k: list(v)[:5] for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise LayerpruneError(
            f"{source}: the weights do not match its {what} "
            f"({bad or info['error_msgs']}); the checkpoint is damaged or was edited"
        )
    return model.eval()


def ensure_bias(adapter: ModelAdapter, layer: nn.Module, mark: bool) -> None:
    """Give a linear layer a zero bias if it has none; `mark`: note that layerprune added it."""
    if getattr(layer, "bias", None) is not None:
        return
    w = adapter.weight(layer)
    layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
    if mark:
        setattr(layer, ADDED_BIAS, True)
