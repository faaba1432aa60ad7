"""Tiny random models, built from configs, one per supported architecture (for architecture tests).

Sizes are the smallest that still exercise what matters: grouped KV heads, sliding-window layers
mixed with full-attention ones (so per-layer config lists are non-trivial), softcapping, Conv1D.
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128
_COMMON = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _llama_like(num_layers: int) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **_COMMON,
    )


def _mixed(num_layers: int) -> list[str]:
    return [_MIXED[i % 4] for i in range(num_layers)]


def tiny_config(arch: str, num_layers: int = 4):
    if arch == "llama":
        return tf.LlamaConfig(**_llama_like(num_layers))
    if arch == "mistral":
        return tf.MistralConfig(**_llama_like(num_layers), sliding_window=8)
    if arch == "qwen2":
        return tf.Qwen2Config(
            **_llama_like(num_layers),
            use_sliding_window=True,
            sliding_window=8,
            layer_types=_mixed(num_layers),
        )
    if arch == "qwen3":
        return tf.Qwen3Config(**_llama_like(num_layers), head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(
            **_llama_like(num_layers),
            head_dim=8,
            sliding_window=8,
            layer_types=_mixed(num_layers),
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=8,
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **_llama_like(num_layers), head_dim=8, sliding_window=8, layer_types=_mixed(num_layers)
        )
    if arch == "phi3":
        return tf.Phi3Config(**_llama_like(num_layers))
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            **{**_COMMON, "bos_token_id": 2},
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=32,
            n_layer=num_layers,
            n_head=4,
            n_positions=64,
            vocab_size=VOCAB,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            max_position_embeddings=64,
            **_COMMON,
        )
    if arch == "mamba":
        return tf.MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=num_layers, **_COMMON)
    raise ValueError(f"no tiny config for {arch}")


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox", "mamba")


def tiny_model(arch: str, num_layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of the given architecture, float32, in eval mode."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, num_layers))
    # Random init leaves some architectures' residual branches near zero; widen the weights a little
    # so that skipping a block visibly changes the output (tests compare logits).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0.0, 0.08)
    return model.float().eval()
