"""Every supported architecture: skip(mask) == remove_blocks, save, reload with plain transformers,
generate with the KV cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter, Unit
from layerprune.models.tiny import ARCHS, tiny_config, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_skip_equals_remove_and_checkpoint_reloads(arch, tmp_path):
    model = tiny_model(arch, num_layers=5)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (2, 24))
    drop = [1, 3]
    mask = [0 if i in drop else 1 for i in range(5)]
    with torch.no_grad():
        dense = model(input_ids=x, use_cache=False).logits
        with adapter.skip(mask):
            skipped = model(input_ids=x, use_cache=False).logits
        restored = model(input_ids=x, use_cache=False).logits
    assert torch.equal(restored, dense), "skip() must put every block back"
    assert (skipped - dense).abs().max() > 1e-3, "skipping blocks must change the output"

    layer_types_before = getattr(model.config, "layer_types", None)
    adapter.remove_blocks(drop)
    with torch.no_grad():
        removed = model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(removed, skipped, rtol=0, atol=1e-6)
    assert model.config.num_hidden_layers == 3 and adapter.num_blocks == 3
    for j, block in enumerate(adapter.blocks):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == j
    if layer_types_before is not None:
        assert list(model.config.layer_types) == [layer_types_before[i] for i in (0, 2, 4)]

    prompt = x[:1, :6]
    with torch.no_grad():
        in_memory = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        cached = reloaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = reloaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, in_memory)
    assert torch.equal(cached, uncached), "KV-cache decoding must agree with full recomputation"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mamba"])
def test_module_skip_of_both_parts_equals_block_skip(arch):
    model = tiny_model(arch, num_layers=3)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        with adapter.skip([1, 1, 0, 0, 1, 1], "module"):
            parts = model(input_ids=x, use_cache=False).logits
        with adapter.skip([1, 0, 1]):
            block = model(input_ids=x, use_cache=False).logits
        with adapter.skip([1, 1, 0, 1, 1, 1], "module"):
            attn_only = model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(parts, block, rtol=0, atol=1e-5)
    assert (attn_only - block).abs().max() > 1e-4


def test_attention_skip_is_the_block_without_its_attention_branch():
    """Hand-run a Llama block with the attention branch removed: x + mlp(norm2(x))."""
    model = tiny_model("llama", num_layers=2)
    adapter = ModelAdapter(model)
    block = adapter.blocks[0]
    h = torch.randn(1, 8, 32)
    calls = {}
    with adapter.zero_parts(0, ["attn"]), torch.no_grad():
        pos = torch.arange(8)[None]
        emb = model.model.rotary_emb(h, position_ids=pos)
        calls["out"] = block(h, position_embeddings=emb, position_ids=pos)
        expected = h + block.mlp(block.post_attention_layernorm(h))
    torch.testing.assert_close(calls["out"], expected)


def test_linear_roles_and_weight_orientation():
    gpt2 = ModelAdapter(tiny_model("gpt2", num_layers=2))
    qkv = gpt2.linears(0)["qkv"]
    assert gpt2.weight(qkv).shape == (96, 32)  # (out, in) although Conv1D stores (in, out)
    llama = ModelAdapter(tiny_model("llama", num_layers=2))
    assert list(llama.linears(1)) == ["q", "k", "v", "o", "gate", "up", "down"]
    assert llama.weight(llama.linears(1)["k"]).shape == (16, 32)  # 2 KV heads of 8


def test_bad_masks_and_removals():
    adapter = ModelAdapter(tiny_model("llama", num_layers=4))
    with pytest.raises(LayerpruneError, match="4 block units"):
        adapter.check_mask([1, 1, 1])
    with pytest.raises(LayerpruneError, match="removes every block"):
        adapter.check_mask([0, 0, 0, 0])
    with pytest.raises(LayerpruneError, match="keep at least one"):
        adapter.remove_blocks([0, 1, 2, 3])
    with pytest.raises(LayerpruneError, match="out of range"):
        adapter.remove_blocks([7])
    mamba = ModelAdapter(tiny_model("mamba", num_layers=2))
    with pytest.raises(LayerpruneError, match="use --unit block"):
        mamba.units("module")


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64))
    with pytest.raises(LayerpruneError, match="'bloom' is not supported; supported: llama, mistral"):
        ModelAdapter(model)


def test_unit_parsing():
    assert Unit.parse("3") == Unit(3) and str(Unit(3, "attn")) == "3.attn"
    assert Unit.parse("5.mlp") == Unit(5, "mlp")
    with pytest.raises(LayerpruneError):
        Unit.parse("3.ffn")


def test_tiny_configs_are_small():
    for arch in ARCHS:
        assert tiny_config(arch).num_hidden_layers == 4


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mamba"])
def test_parts_partition_the_block_parameters(arch):
    adapter = ModelAdapter(tiny_model(arch, num_layers=2))
    block = {n for n, _ in adapter.unit_parameters(Unit(1))}
    attn = {n for n, _ in adapter.unit_parameters(Unit(1, "attn"))}
    mlp = {n for n, _ in adapter.unit_parameters(Unit(1, "mlp"))}
    assert attn and mlp and not attn & mlp
    assert attn | mlp == block, f"parameters in neither part: {block - attn - mlp}"
    for path in adapter.spec.norms:
        assert any(n.startswith(path + ".") for n in block), f"norm {path} not found"
