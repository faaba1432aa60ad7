"""llm-compressor's side of bench/peers.py: run by the venv bench/peers.py builds from
bench/peers/llmcompressor.txt, never by ours.

    python run_llmcompressor.py --model DIR --ids ids.pt --out OUT --result R.json
        --method wanda|sparsegpt|magnitude --sparsity S [--nm 2:4] [--owl M,LAMBDA] [--targets linear]

The recipe is the one of llm-compressor's own examples: the modifier with
targets = the decoder layers (re:model.layers.\\d*$), so lm_head and the tied embedding stay dense;
the sequential pipeline, batch 1, the ids unshuffled and untruncated. SparseGPT: block 128,
dampening 1 % (the paper's and our defaults). The model is saved uncompressed (dense safetensors).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from ids import EmbeddingTap, Phases, load_ids, runner_parser  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import MagnitudePruningModifier, WandaPruningModifier  # noqa: E402
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

LAYERS = [r"re:model.layers.\d*$"]
# --targets linear: every Linear but lm_head, as a user would write it from the modifier's docs
ALL_LINEARS = {"targets": ["Linear"], "ignore": ["lm_head"]}


def recipe(a):
    structure = a.nm or "0:0"
    where = ALL_LINEARS if a.targets == "linear" else {"targets": LAYERS}
    owl = {}
    if a.owl:
        m, lam = (float(x) for x in a.owl.split(","))
        owl = {"sparsity_profile": "owl", "owl_m": int(m), "owl_lmbda": lam}
    if a.method == "wanda":
        return WandaPruningModifier(sparsity=a.sparsity, mask_structure=structure, **where, **owl)
    if a.method == "sparsegpt":
        return SparseGPTModifier(
            sparsity=a.sparsity,
            mask_structure=structure,
            **where,
            block_size=128,
            dampening_frac=0.01,
            **owl,
        )
    if a.method == "magnitude":
        # its data-free modifier on every linear of the decoder layers (targets are module names). It is a
        # training-time modifier: the masks reach the weights at optimizer steps (OPTIM_POST_STEP), which
        # oneshot has none of; the bench records what comes out.
        return MagnitudePruningModifier(
            targets=[r"re:model\.layers\.\d+\..*_proj$"],
            init_sparsity=a.sparsity,
            final_sparsity=a.sparsity,
            start=0,
            end=1,
            update=1,
        )
    raise SystemExit(f"unknown method {a.method}")


def main() -> None:
    ap = runner_parser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--nm")
    ap.add_argument("--owl")
    ap.add_argument("--targets", choices=("layers", "linear"), default="layers")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ph = Phases(T0)
    with ph.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        ids, meta = load_ids(Path(a.ids))
        n, seqlen = ids.shape
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seqlen] * n})
    tap = EmbeddingTap(model.get_input_embeddings())
    kwargs = {}
    if a.method != "magnitude":
        kwargs = dict(
            dataset=data,
            num_calibration_samples=n,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
            batch_size=1,
        )
    with ph.phase("step"):
        oneshot(model=model, recipe=[recipe(a)], **kwargs)
    tap.close()
    with ph.phase("save"):
        out = Path(a.out)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, save_compressed=False)
        for f in Path(a.model).iterdir():  # the tokenizer, as the model folder had it
            if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
                shutil.copy(f, out / f.name)
    ph.write(a.result, "llm-compressor", tap, meta)


if __name__ == "__main__":
    main()
