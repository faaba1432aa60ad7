"""Torch-Pruning's side of bench/peers.py: run by the venv built from bench/peers/torchpruning.txt.

    python run_torchpruning.py --model DIR --out OUT --result R.json --ratio R

The recipe of Torch-Pruning's LLM example (examples/LLMs/prune_llm.py, read, not copied): BasePruner
with GroupMagnitudeImportance(p=2, group_reduction="mean") (data-free), the same ratio for channels,
the hidden size and whole attention heads (KV groups, prune_head_dims=False so RoPE is kept),
round_to=4, lm_head ignored, traced on one short prompt; then the config is rewritten from the
pruned shapes as the example does, and the model saved with save_pretrained.
"""

from __future__ import annotations

import time
from pathlib import Path

T0 = time.perf_counter()

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from ids import Phases, runner_parser, save_hf  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def block_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def prune(model, tokenizer, ratio: float) -> None:
    cfg = model.config
    inputs = torch.tensor(tokenizer.encode("Hello world.")).unsqueeze(0)
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False,
        output_transform=lambda x: x.logits,
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        round_to=4,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads = m.q_proj.out_features // m.head_dim
            cfg.num_attention_heads = heads
            kv = m.k_proj.out_features // m.head_dim
            cfg.num_key_value_heads = kv if gqa else heads
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = heads // cfg.num_key_value_heads
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    cfg.head_dim = model.model.layers[0].self_attn.head_dim


def main() -> None:
    ap = runner_parser(with_ids=False)
    ap.add_argument("--ratio", type=float, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    ph = Phases(T0)
    with ph.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
        dense_blocks = block_params(model)
    with ph.phase("step"):
        prune(model, tokenizer, a.ratio)
    with ph.phase("save"):
        save_hf(model, tokenizer, a.out)
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    ph.write(
        a.result,
        "torch-pruning",
        ratio=a.ratio,
        block_fraction_removed=1 - block_params(model) / dense_blocks,
        config={k: getattr(model.config, k) for k in keys},
    )


if __name__ == "__main__":
    main()
