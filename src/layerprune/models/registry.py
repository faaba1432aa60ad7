"""Where each supported architecture keeps its blocks, projections and norms.

Adding an architecture is adding one `ArchSpec` here (and a tiny config in tiny.py for its tests);
no method anywhere else names an architecture.

Roles of linear layers use one vocabulary across architectures: q, k, v, o for attention and
gate, up, down for the MLP; fused projections are qkv and gate_up; Mamba's are in, x, dt, out.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # attribute path of the ModuleList of blocks, from the *ForCausalLM root
    linears: dict[str, str]  # role -> attribute path inside a block
    attention: str | None  # submodule whose output is the attention branch of the residual stream
    mlp: str | None  # submodule whose output is the MLP branch
    norms: dict[str, str]  # norm path -> the part ("attn" | "mlp") whose input or output it normalises
    attn_returns_tuple: bool = True  # attention modules return (output, weights)
    transposed_weights: bool = False  # GPT-2's Conv1D stores weight as (in, out)
    bos_every_window: bool = False  # Gemma expects BOS at the start of every sequence
    mlp_modules: tuple[str, ...] = ()  # the MLP's submodules when it is not one module (OPT: fc1, fc2)
    # part -> role of the projection that writes the part's output into the residual stream
    output_roles: dict[str, str] = field(default_factory=lambda: {"attn": "o", "mlp": "down"})
    # ---- widths, for structured (width) pruning ----
    # Rows of the fused qkv projection: "concat" = [q heads; k heads; v heads] (phi3, GPT-2 c_attn),
    # "interleaved" = per head [q; k; v] (gpt_neox: view(..., heads, 3 * head_dim)); "separate" = no qkv.
    # A fused gate_up projection's rows are always [gate; up] (phi3: chunk(2)).
    qkv_layout: str = "separate"
    heads_key: str = "num_attention_heads"  # config keys (aliases such as GPT-2's n_head resolve)
    kv_heads_key: str | None = "num_key_value_heads"  # None: no GQA, one KV head per query head
    head_dim_key: str | None = "head_dim"  # None: head size is hidden // heads, not a config entry
    intermediate_key: str = "intermediate_size"
    intermediate_default: int = 4  # config value None means this many times the hidden size (GPT-2)
    # Attributes of the attention module that its forward reads: attr -> "heads" | "kv_heads" | "q_width".
    attn_module_attrs: dict[str, str] = field(default_factory=dict)
    # Config entries the attention forward reads from its own `config` (attr -> "heads" | "kv_heads").
    attn_config_keys: dict[str, str] = field(default_factory=dict)
    # part -> config flag that gives every projection of the part a bias (Llama: attention_bias for
    # q, k, v, o; mlp_bias for gate, up, down); a bias added to o / down (FLAP's compensation) is then
    # stated by the config, otherwise by the per-block shapes (models/shrink.py).
    bias_config_keys: dict[str, str] = field(default_factory=dict)
    # ---- logits: what the *ForCausalLM forward does to the output embedding's result, as config keys ----
    logit_scale_key: str | None = None  # logits * config[key] (Cohere's logit_scale)
    logit_divisor_key: str | None = None  # logits / config[key] (Granite's logits_scaling)
    logit_softcap_key: str | None = None  # cap * tanh(logits / cap), when config[key] is set (Gemma 2 / 3)


_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_LLAMA_NORMS = {"input_layernorm": "attn", "post_attention_layernorm": "mlp"}
# Gemma normalises both sides of each branch.
_GEMMA_NORMS = {
    "input_layernorm": "attn",
    "post_attention_layernorm": "attn",
    "pre_feedforward_layernorm": "mlp",
    "post_feedforward_layernorm": "mlp",
}

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        "llama",
        ("llama",),
        "model.layers",
        _LLAMA_LINEARS,
        "self_attn",
        "mlp",
        _LLAMA_NORMS,
        bias_config_keys={"attn": "attention_bias", "mlp": "mlp_bias"},
    ),
    ArchSpec("mistral", ("mistral",), "model.layers", _LLAMA_LINEARS, "self_attn", "mlp", _LLAMA_NORMS),
    ArchSpec("qwen2", ("qwen2",), "model.layers", _LLAMA_LINEARS, "self_attn", "mlp", _LLAMA_NORMS),
    ArchSpec(
        "qwen3",
        ("qwen3",),
        "model.layers",
        _LLAMA_LINEARS,
        "self_attn",
        "mlp",
        {**_LLAMA_NORMS, "self_attn.q_norm": "attn", "self_attn.k_norm": "attn"},
    ),
    ArchSpec(
        "gemma2",
        ("gemma2",),
        "model.layers",
        _LLAMA_LINEARS,
        "self_attn",
        "mlp",
        _GEMMA_NORMS,
        bos_every_window=True,
        logit_softcap_key="final_logit_softcapping",
    ),
    ArchSpec(
        "gemma3",
        ("gemma3_text",),
        "model.layers",
        _LLAMA_LINEARS,
        "self_attn",
        "mlp",
        {**_GEMMA_NORMS, "self_attn.q_norm": "attn", "self_attn.k_norm": "attn"},
        bos_every_window=True,
        logit_softcap_key="final_logit_softcapping",
    ),
    ArchSpec(
        "phi3",
        ("phi3",),
        "model.layers",
        {
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        "self_attn",
        "mlp",
        _LLAMA_NORMS,
        qkv_layout="concat",
        attn_module_attrs={"num_key_value_heads": "kv_heads"},
        attn_config_keys={"num_attention_heads": "heads"},  # its forward reads config.num_attention_heads
    ),
    ArchSpec(
        "opt",
        ("opt",),
        "model.decoder.layers",
        {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
        "self_attn",
        "fc2",  # OPT has no MLP module: zeroing fc2's output removes the MLP branch
        {"self_attn_layer_norm": "attn", "final_layer_norm": "mlp"},
        mlp_modules=("fc1", "fc2"),
        kv_heads_key=None,
        head_dim_key=None,
        intermediate_key="ffn_dim",
        attn_module_attrs={"num_heads": "heads"},
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        "attn",
        "mlp",
        {"ln_1": "attn", "ln_2": "mlp"},
        transposed_weights=True,
        qkv_layout="concat",
        kv_heads_key=None,
        head_dim_key=None,
        intermediate_key="n_inner",
        attn_module_attrs={"num_heads": "heads", "split_size": "q_width"},
    ),
    ArchSpec(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        {
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
        "attention",
        "mlp",
        {"input_layernorm": "attn", "post_attention_layernorm": "mlp"},
        qkv_layout="interleaved",
        kv_heads_key=None,
        head_dim_key=None,
    ),
    ArchSpec(
        "mamba",
        ("mamba",),
        "backbone.layers",
        {"in": "mixer.in_proj", "x": "mixer.x_proj", "dt": "mixer.dt_proj", "out": "mixer.out_proj"},
        None,  # a Mamba block is one mixer: no attention / MLP split
        None,
        {"norm": "mlp"},
    ),
)

BY_MODEL_TYPE = {t: s for s in SPECS for t in s.model_types}
SUPPORTED = ", ".join(s.name for s in SPECS)
