"""Peak resident memory of one Taylor scoring run, in a fresh process (used by bench/depth.py).

    python bench/_rss.py MODE [MODEL]     MODE = ours | reference | activations; MODEL = fixture | wide

ours:        layerprune's Taylor scorer (gradients reduced by hooks as they are produced);
reference:   the reference's way: every parameter's gradient kept, salience tensors cloned;
activations: the same forward (every weight requires grad, so autograd saves what weight gradients
             need) and a backward to the input embeddings only (torch.autograd.grad), which
             computes every activation gradient and no weight gradient: the activation memory.
MODEL `wide` is a random 8-block Llama with hidden 1024 (111M parameters, the fixture's tokenizer
and vocabulary), where weight gradients, not activations, dominate as they do in 7B models.
Calibration: 10 x 128 tokens of fixture:val (the paper's default).
Prints JSON: RSS after loading the model, the peak (VmHWM) reached while scoring, and the sizes.
"""

import json
import sys

import torch
from _proc import reset_peak, status


def wide_model(lm):
    import transformers as tf

    from layerprune.models.adapter import ModelAdapter
    from layerprune.models.loading import LoadedModel

    cfg = tf.LlamaConfig(
        vocab_size=lm.model.config.vocab_size,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=lm.model.config.bos_token_id,
        eos_token_id=lm.model.config.eos_token_id,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    return LoadedModel("wide", model, lm.tokenizer, ModelAdapter(model), None)


def main(mode: str, which: str) -> None:
    from layerprune.data import calibration
    from layerprune.models.loading import load
    from layerprune.scorers import scorer

    lm = load("fixture", device="cpu", quiet=True)
    windows = calibration(lm)
    if which == "wide":
        lm = wide_model(lm)
    ids = windows.input_ids
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in lm.adapter.blocks)
    reset_peak()
    after_load = status("VmRSS")
    if mode == "ours":
        scorer("taylor")(lm.model, lm.adapter, windows, progress=False)
    elif mode == "reference":
        sal = {}
        loss = lm.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        for k, p in lm.model.named_parameters():
            if "weight" in k and "embed_tokens" not in k:
                sal[k] = (p * p.grad).data.clone().float()
    elif mode == "activations":
        emb = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = lm.model(inputs_embeds=emb, labels=ids, use_cache=False).loss
        torch.autograd.grad(loss, [emb])
    print(
        json.dumps(
            {
                "mode": mode,
                "model": which,
                "model_bytes": model_bytes,
                "largest_block_bytes": block_bytes,
                "rss_after_load": after_load,
                "peak": status("VmHWM"),
            }
        )
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fixture")
