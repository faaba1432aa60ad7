"""Torch-Pruning's side of bench/peers.py: run by the venv built from bench/peers/torchpruning.txt.

    python run_torchpruning.py --model DIR --out OUT --result R.json --ratio R

The recipe of Torch-Pruning's LLM example (examples/LLMs/prune_llm.py, read, not copied): BasePruner
with GroupMagnitudeImportance(p=2, group_reduction="mean") (data-free), the same ratio for channels,
the hidden size and whole attention heads (KV groups, prune_head_dims=False so RoPE is kept),
round_to=4, lm_head ignored, traced on one short prompt; then the config is rewritten from the
pruned shapes as the example does, and the model saved with save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

T0 = time.perf_counter()

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from ids import peak_rss  # noqa: E402
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--result", required=True)
    ap.add_argument(
        "--ratio", type=float, nargs="+", required=True, help="several: probe block parameters only"
    )
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    imported = time.perf_counter() - T0
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    if len(a.ratio) > 1:  # the driver's probe: block parameters kept at each ratio
        probe = {}
        for r in a.ratio:
            model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
            dense = block_params(model)
            prune(model, tokenizer, r)
            probe[str(r)] = {"block_fraction_removed": 1 - block_params(model) / dense}
        Path(a.result).write_text(json.dumps(probe, indent=1))
        return

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    dense_blocks = block_params(model)
    loaded = time.perf_counter() - t
    rss = {"after_load": peak_rss()}
    t = time.perf_counter()
    prune(model, tokenizer, a.ratio[0])
    step = time.perf_counter() - t
    rss["after_step"] = peak_rss()
    t = time.perf_counter()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = time.perf_counter() - t
    rss["after_save"] = peak_rss()
    result = {
        "tool": "torch-pruning",
        "import_s": imported,
        "load_s": loaded,
        "step_s": step,
        "save_s": saved,
        "peak_rss_by_phase": rss,
        "ratio": a.ratio[0],
        "block_fraction_removed": 1 - block_params(model) / dense_blocks,
        "config": {
            k: getattr(model.config, k)
            for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        },
    }
    Path(a.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
