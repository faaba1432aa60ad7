"""Torch-Pruning's side of bench/peers.py: run by the venv built from bench/peers/torchpruning.txt.

    python run_torchpruning.py --model DIR --out OUT --result R.json --ratio R

The recipe of Torch-Pruning's LLM example (examples/LLMs/prune_llm.py, read, not copied): BasePruner
with GroupMagnitudeImportance(p=2, group_reduction="mean") (data-free), the same ratio for channels,
the hidden size and whole attention heads (KV groups, prune_head_dims=False so RoPE is kept),
round_to=4, lm_head ignored, traced on one short prompt; then the config is rewritten from the
pruned shapes as the example does, and the model saved with save_pretrained.

Its venv pins transformers 4.46.3, the version the example's readme shows (under transformers 5 the
dependency graph does not finish; see bench/peers/torchpruning.txt). That version cannot read the
model folder's tokenizer config (written by transformers 5), so the prompt is encoded with the folder's
tokenizer.json through PreTrainedTokenizerFast, and the folder's tokenizer files are copied to the output
unchanged. A tied lm_head stays tied (pruned with the embedding's hidden-size channels).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

T0 = time.perf_counter()

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from ids import Phases, runner_parser  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402


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


SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")


def save(model, source: Path, out: Path) -> None:
    """save_pretrained's weights (the folder replaced if there); config.json = the source's config with the
    pruned shapes (the example's config update, on the source's own keys: transformers 4.46 does not read
    the source's `rope_parameters` and would write its default rope_theta of 10000 beside them); the
    source folder's tokenizer files."""
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    config = json.loads((source / "config.json").read_text())
    config.update({k: getattr(model.config, k) for k in SHAPE_KEYS if k in config})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)


def main() -> None:
    ap = runner_parser(with_ids=False)
    ap.add_argument("--ratio", type=float, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(a.model) / "tokenizer.json"))

    ph = Phases(T0)
    with ph.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
        dense_blocks = block_params(model)
    with ph.phase("step"):
        prune(model, tokenizer, a.ratio)
    with ph.phase("save"):
        save(model, Path(a.model), Path(a.out))
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
