"""Our transformers config class for `"model_type": "nemotron-nas"` (DeciLM), for engines that need one.

vLLM's `DeciLMForCausalLM` reads a config object, not config.json: `config.block_configs[i].attention
.n_heads_in_group`, `.ffn.ffn_mult`, `.no_op`, and Llama's global keys; transformers has no class for
`nemotron-nas`, so until now a user copied NVIDIA's remote `configuration_decilm.py` and passed
`--trust-remote-code`. This class is written from the released key set (`nemotron_nas.py`) and is
what layerprune's vLLM plugin registers. It reads any nemotron-nas config.json (ours or NVIDIA's)
and writes it back with the same `block_configs`.

It imports transformers (which imports torch where torch is installed): only the plugin's
`register()` imports this module, inside vLLM, which has both already.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .nemotron_nas import MODEL_TYPE, ffn_mult_ok, heads_in_group_ok, parse_blocks


class NemotronNasConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        block_configs: list | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int | None = None,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pretraining_tp: int = 1,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        intermediate_size: int | None = None,  # null in every release: widths are per block
        num_key_value_heads: int | None = None,  # null too: KV heads per block
        **kwargs,
    ):
        blocks = parse_blocks(block_configs if block_configs is not None else [])
        if num_hidden_layers is None:
            num_hidden_layers = len(blocks)
        if block_configs is not None and len(blocks) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(blocks)} entries for num_hidden_layers = {num_hidden_layers}"
            )
        for i, b in enumerate(blocks):
            a, f = b.attention, b.ffn
            if not (
                a.no_op or a.replace_with_linear or heads_in_group_ok(a.n_heads_in_group, num_attention_heads)
            ):
                raise ValueError(
                    f"block_configs[{i}].attention.n_heads_in_group is {a.n_heads_in_group!r}: it must divide "
                    f"num_attention_heads = {num_attention_heads} (or set no_op)"
                )
            if not (f.no_op or f.replace_with_linear or ffn_mult_ok(f.ffn_mult)):
                raise ValueError(
                    f"block_configs[{i}].ffn.ffn_mult is {f.ffn_mult!r}: give a positive number (or no_op)"
                )
        self.block_configs = blocks
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.intermediate_size = intermediate_size
        self.num_key_value_heads = num_key_value_heads
        self.rope_theta = rope_theta
        # transformers 5 and vLLM read RoPE from one dict, `rope_parameters` (transformers' `rope_scaling`
        # is an alias of it); the released files state it as rope_theta plus rope_scaling (null, or e.g.
        # Llama 3's {"rope_type": "llama3", "factor": ...}), and to_dict writes it back that way.
        if rope_parameters is None:
            rope_parameters = {**(rope_scaling or {}), "rope_theta": rope_theta}
            rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
        self.rope_parameters = rope_parameters
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        rope = dict(self.rope_parameters or {})
        out["rope_theta"] = rope.pop("rope_theta", self.rope_theta)
        out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        return out
