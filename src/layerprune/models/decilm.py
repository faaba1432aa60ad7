"""DeciLM / Nemotron-NAS checkpoints: per-block widths in the one format serving engines load.

NVIDIA's Puzzle checkpoints (Llama-3.1-Nemotron-51B, -Super-49B, -Ultra-253B) describe each block
in `block_configs`: `attention.n_heads_in_group` (KV heads = H / n_heads_in_group: every attention
block keeps the config's H query heads) or `attention.no_op`, and `ffn.ffn_mult` (MLP width
`find_multiple(int(2 * ffn_mult * hidden / 3), 256)`) or `ffn.no_op`; the tensors are Llama's, and
a removed module has none. vLLM (`DeciLMForCausalLM`), llama.cpp's converter (`deci` GGUF), mlx-lm
(`nemotron-nas`) and TensorRT-LLM read it.

Here:
- `check_deployable(adapter, multiple)`: the model's blocks are Llama's (Llama, Mistral without a
  sliding window, Qwen2), with head size hidden / H, so that the format can state it.
- `to_decilm(adapter, removed)`: after `shrink` narrowed the MLPs, the removed parts become no-ops
  and blocks with both removed are deleted; the in-memory config is marked (`DEPLOY_KEY`), and
  `checkpoint.export` then writes `config_dict(adapter)` as config.json.
- `llama_config(doc)` and `load_model(source, config)`: a DeciLM checkpoint from anywhere loads
  natively, as a `LlamaForCausalLM` whose blocks are built from per-block Llama configs (no-op parts
  as `ZeroBranch`), without remote code; from_pretrained then reads the safetensors strictly.

`ffn_mult = 3 * I / (2 * hidden)` round-trips every multiple of 256 through the engines' formula,
also after mlx-lm rounds it to 6 decimals (tests/test_decilm.py checks it over a range).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import LayerpruneError
from ..registry import PARTS, Unit
from ..serving.nemotron_nas import (  # the format's keys and arithmetic, torch-free (the vLLM plugin reads them)
    ARCHITECTURE,
    ATTENTION_DEFAULTS,
    FFN_DEFAULTS,
    FFN_MULTIPLE,
    MODEL_TYPE,
    ffn_mult,
    ffn_mult_ok,
    ffn_width,
    heads_in_group_ok,
)
from .adapter import ModelAdapter, ZeroBranch, set_module

DEPLOY_KEY = "layerprune_deploy"  # in-memory config: "decilm" = export writes config_dict()
BLOCKS_KEY = "layerprune_decilm_blocks"  # in-memory config of a loaded DeciLM checkpoint
DEPLOYABLE = ("llama", "mistral", "qwen2")
# NVIDIA's checkpoints also carry "auto_map", naming remote-code classes (configuration_decilm.py,
# modeling_decilm.py) that ship beside them. We write no code, so no auto_map either: a reference
# to files that are absent makes transformers ask, or refuse, to run them. layerprune, llama.cpp's
# converter and mlx-lm read config.json directly; vLLM through our own config class, which
# layerprune's vLLM plugin registers (serving/vllm_plugin.py).


def check_deployable(
    adapter: ModelAdapter, multiple: int | None = None, where: str = "--deploy decilm"
) -> None:
    """One line saying why the model's blocks cannot be written as DeciLM blocks, if they cannot."""
    config = adapter.config
    kind = getattr(config, "model_type", "?")
    if kind not in DEPLOYABLE:
        raise LayerpruneError(
            f"{where}: DeciLM blocks are Llama blocks; {kind} blocks differ (use one of {', '.join(DEPLOYABLE)}, "
            "or drop --deploy: the per-block checkpoint then loads in layerprune)"
        )
    H, hidden = adapter.num_heads, config.hidden_size
    if hidden % H or adapter.head_dim != hidden // H:
        raise LayerpruneError(
            f"{where}: the heads are {adapter.head_dim} wide, not hidden / heads = {hidden / H:g}, which DeciLM "
            "configs cannot state; drop --deploy"
        )
    window = getattr(config, "sliding_window", None)
    if window and (kind == "mistral" or getattr(config, "use_sliding_window", False)):
        raise LayerpruneError(
            f"{where}: the model attends through a {window}-token sliding window, which DeciLM's Llama blocks "
            "do not have; drop --deploy"
        )
    if multiple is not None:
        check_channel_multiple(multiple)


def check_channel_multiple(multiple) -> None:
    """--channel-multiple must be a multiple of 256: the engines round ffn_mult's width to one."""
    if (
        isinstance(multiple, bool)
        or not isinstance(multiple, int)
        or multiple < FFN_MULTIPLE
        or multiple % FFN_MULTIPLE
    ):
        raise LayerpruneError(
            f"--channel-multiple {multiple}: DeciLM widths come from ffn_mult rounded up to a multiple of "
            f"{FFN_MULTIPLE}; use {FFN_MULTIPLE} or a multiple of it"
        )


def _removed(adapter: ModelAdapter, i: int, part: str) -> bool:
    return isinstance(adapter.part(i, part), ZeroBranch)


def remove_part(adapter: ModelAdapter, i: int, part: str) -> None:
    """Block i's attention or MLP becomes a no-op, and the norm in front of it goes too: a DeciLM
    block without attention has no input_layernorm, one without MLP no post_attention_layernorm
    (NVIDIA's checkpoints, vLLM and llama.cpp's loader expect exactly those tensors)."""
    adapter.silence_parts([Unit(i, part)])
    for path, owner in adapter.spec.norms.items():
        if owner == part:
            set_module(adapter.blocks[i], path, nn.Identity())


@torch.no_grad()
def to_decilm(adapter: ModelAdapter, removed: dict[int, set[str]]) -> list[int]:
    """Turn a model whose MLPs `shrink` narrowed into a DeciLM one: `removed` {block: parts} become
    no-ops, blocks losing both are deleted; the blocks deleted."""
    from .shrink import BLOCK_CONFIGS_KEY, ensure_bias

    adapter.require_in_memory("a DeciLM export")
    check_deployable(adapter)
    if removed.get(0, set()) & {"attn"}:
        raise LayerpruneError(
            "a DeciLM model keeps block 0's attention; re-make the plan with --deploy decilm"
        )
    for i, parts in sorted(removed.items()):
        if parts == {"mlp"}:
            raise LayerpruneError(
                f"block {i} would keep its attention without an MLP, which llama.cpp's deci runtime computes "
                "wrongly; remove both or keep some channels"
            )
    gone = sorted(i for i, parts in removed.items() if set(PARTS) <= parts)
    for i, parts in sorted(removed.items()):
        if i not in gone:
            for part in parts:
                remove_part(adapter, i, part)
    linears = [adapter.linears(i) for i in range(adapter.num_blocks) if not _removed(adapter, i, "attn")]
    if any(getattr(lin["q"], "bias", None) is not None for lin in linears):  # Qwen2: q, k, v biased, o not
        for lin in linears:  # DeciLM's one attention_bias flag gives every projection a bias
            for role in ("q", "k", "v", "o"):
                ensure_bias(adapter, lin[role], mark=False)
    if gone:
        adapter.remove_blocks(gone)
    if hasattr(adapter.config, BLOCK_CONFIGS_KEY):
        delattr(adapter.config, BLOCK_CONFIGS_KEY)
    setattr(adapter.config, DEPLOY_KEY, "decilm")
    return gone


def block_configs(adapter: ModelAdapter) -> list[dict]:
    """The model's blocks as DeciLM block configs (exactly the released keys)."""
    H, hidden = adapter.num_heads, adapter.config.hidden_size
    out = []
    for i in range(adapter.num_blocks):
        attention, ffn = dict(ATTENTION_DEFAULTS), dict(FFN_DEFAULTS)
        if _removed(adapter, i, "attn"):
            attention["no_op"] = True
        else:
            heads, kv = adapter.attn_heads(i)
            if heads != H or H % kv:
                raise LayerpruneError(
                    f"block {i} has {heads} query heads and {kv} KV heads: DeciLM keeps all {H} query heads "
                    "in every attention block; re-make the plan with --deploy decilm"
                )
            attention["n_heads_in_group"] = H // kv
        if _removed(adapter, i, "mlp"):
            ffn["no_op"] = True
        else:
            width = adapter.mlp_channels(i)
            mult = ffn_mult(width, hidden)
            if ffn_width(mult, hidden) != width:
                raise LayerpruneError(
                    f"block {i}'s MLP is {width} channels wide, which ffn_mult cannot state (a multiple of "
                    f"{FFN_MULTIPLE} can); re-make the plan with --deploy decilm"
                )
            ffn["ffn_mult"] = mult
        out.append({"attention": attention, "ffn": ffn})
    return out


def config_dict(adapter: ModelAdapter, dtype: torch.dtype | None = None) -> dict:
    """config.json of the model as a DeciLM checkpoint: NVIDIA's top-level keys, Llama's values."""
    c = adapter.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    attn_bias = any(
        getattr(adapter.linears(i)["q"], "bias", None) is not None
        for i in range(adapter.num_blocks)
        if not _removed(adapter, i, "attn")
    )
    mlp_bias = any(
        getattr(adapter.linears(i)["down"], "bias", None) is not None
        for i in range(adapter.num_blocks)
        if not _removed(adapter, i, "mlp")
    )
    doc = {
        "architectures": [ARCHITECTURE],
        "attention_bias": attn_bias,
        "attention_dropout": float(getattr(c, "attention_dropout", 0.0) or 0.0),
        "block_configs": block_configs(adapter),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size,
        "initializer_range": c.initializer_range,
        "intermediate_size": None,
        "max_position_embeddings": c.max_position_embeddings,
        "mlp_bias": mlp_bias,
        "model_type": MODEL_TYPE,
        "num_attention_heads": adapter.num_heads,
        "num_hidden_layers": adapter.num_blocks,
        "num_key_value_heads": None,
        "pad_token_id": getattr(c, "pad_token_id", None),
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": scaling,
        "rope_theta": theta,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "torch_dtype": str(dtype or torch.float32).removeprefix("torch."),
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }
    from transformers import __version__

    doc["transformers_version"] = __version__
    return doc


# ---- reading a DeciLM checkpoint -------------------------------------------------------------------
def _block_shapes(doc: dict, where: str) -> list[tuple[int | None, int | None]]:
    """(KV heads or None, MLP width or None) per block, checked."""
    blocks, H, hidden = doc.get("block_configs"), doc.get("num_attention_heads"), doc.get("hidden_size")
    L = doc.get("num_hidden_layers")
    if not isinstance(blocks, list) or len(blocks) != L:
        raise LayerpruneError(
            f"{where}: a nemotron-nas config needs block_configs with one entry per layer ({L})"
        )
    out = []
    for i, b in enumerate(blocks):
        a, f = (b or {}).get("attention"), (b or {}).get("ffn")
        if not isinstance(a, dict) or not isinstance(f, dict):
            raise LayerpruneError(f"{where}: block_configs[{i}] needs 'attention' and 'ffn' objects")
        if a.get("replace_with_linear") or f.get("replace_with_linear"):
            raise LayerpruneError(
                f"{where}: block {i} replaces a module with a linear layer, which layerprune does not load yet"
            )
        if a.get("no_op"):
            kv = None
        else:
            n = a.get("n_heads_in_group")
            if not heads_in_group_ok(n, H):
                raise LayerpruneError(
                    f"{where}: block {i}'s attention.n_heads_in_group is {n!r}; it must divide {H} (or set no_op)"
                )
            kv = H // n
        if f.get("no_op"):
            width = None
        else:
            m = f.get("ffn_mult")
            if not ffn_mult_ok(m):
                raise LayerpruneError(
                    f"{where}: block {i}'s ffn.ffn_mult is {m!r}; give a positive number (or no_op)"
                )
            width = ffn_width(m, hidden)
        out.append((kv, width))
    return out


def llama_config(doc: dict, where: str = "the config"):
    """The LlamaConfig a DeciLM config.json describes, its block shapes under BLOCKS_KEY."""
    from transformers import LlamaConfig

    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(doc.get(key), int):
            raise LayerpruneError(f"{where}: a nemotron-nas config needs an integer {key}")
    shapes = _block_shapes(doc, where)
    H = doc["num_attention_heads"]
    rope = {"rope_type": "default", **(doc.get("rope_scaling") or {})}
    rope["rope_theta"] = doc.get("rope_theta", 10000.0)
    kv = [k for k, _ in shapes if k is not None] or [H]
    widths = [w for _, w in shapes if w is not None] or [FFN_MULTIPLE]
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "initializer_range", "rms_norm_eps",
            "max_position_embeddings", "attention_bias", "mlp_bias", "attention_dropout", "tie_word_embeddings")  # fmt: skip
    config = LlamaConfig(
        hidden_size=doc["hidden_size"],
        num_attention_heads=H,
        num_hidden_layers=doc["num_hidden_layers"],
        vocab_size=doc["vocab_size"],
        num_key_value_heads=max(kv),
        intermediate_size=max(widths),
        head_dim=doc["hidden_size"] // H,
        rope_parameters=rope,
        **{k: doc[k] for k in keep if k in doc},
    )
    if doc.get("torch_dtype") or doc.get("dtype"):
        config.dtype = doc.get("dtype") or doc.get("torch_dtype")
    setattr(config, BLOCKS_KEY, [list(s) for s in shapes])
    setattr(config, DEPLOY_KEY, "decilm")
    return config


def build_blocks(model: nn.Module) -> None:
    """Give a LlamaForCausalLM built from `llama_config` its per-block shapes (right after
    construction: the weights come from the checkpoint)."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    config = model.config
    adapter = ModelAdapter(model)
    for i, (kv, width) in enumerate(getattr(config, BLOCKS_KEY)):
        block = adapter.blocks[i]
        own = copy.copy(config)
        if kv is None:
            remove_part(adapter, i, "attn")
        elif kv != config.num_key_value_heads:
            own.num_key_value_heads = kv
            block.self_attn = LlamaAttention(own, layer_idx=i)
        if width is None:
            remove_part(adapter, i, "mlp")
        elif width != config.intermediate_size:
            own.intermediate_size = width
            block.mlp = LlamaMLP(own)


def load_model(source: str, config, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a DeciLM checkpoint natively (`llama_config` gave `config`), strictly."""
    from transformers import LlamaForCausalLM

    from .shrink import load_rebuilt

    return load_rebuilt(LlamaForCausalLM, build_blocks, source, config, dtype, "block_configs")
