"""Width pruning mechanics: layouts, masks in place, physical removal, checkpoints that reload."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from layerprune.checkpoint import export
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import FIXTURE_DIR, LoadedModel
from layerprune.models.shrink import BLOCK_CONFIGS_KEY, load_shrunk, shrink
from layerprune.models.tiny import ARCHS, VOCAB, tiny_model
from layerprune.models.width import WidthMask, layout, masked, units
from layerprune.plans import WidthPlan

SPLIT = [a for a in ARCHS if a != "mamba"]
# The config of these cannot state a head size other than hidden // heads.
FIXED_HEAD_SIZE = ("opt", "gpt2", "gpt_neox")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURE_DIR)


def ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 12), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def random_masks(adapter, seed=0):
    """Per block: a random subset of groups (maybe all) and of channels (some removed), unsorted."""
    rng = random.Random(seed)
    masks = []
    for i in range(adapter.num_blocks):
        g, c = units(adapter, i)
        masks.append(
            WidthMask(
                rng.sample(range(g), rng.randint(1, g)), rng.sample(range(c), rng.randint(c // 2, c - 1))
            )
        )
    return masks


def as_lm(model, tokenizer, name="tiny"):
    return LoadedModel(name, model, tokenizer, ModelAdapter(model), None)


def width_plan(num_blocks=4):
    return WidthPlan(
        model={"name": "tiny", "fingerprint": "f", "num_blocks": num_blocks},
        method="test",
        attn=[0.0] * num_blocks,
        mlp=[0.0] * num_blocks,
    )


# ---- layout ------------------------------------------------------------------------------------------
def test_layouts_of_fused_projections():
    # phi3: qkv rows [q (4 heads); k (2); v (2)], head_dim 8, 2 query heads per group; gate_up [gate; up]
    lay = layout(ModelAdapter(tiny_model("phi3")), 0, "attn")
    axis, idx = lay["qkv"]
    assert axis == 0 and idx.shape == (2, 32)
    assert idx[1].tolist() == list(range(16, 32)) + list(range(40, 48)) + list(range(56, 64))
    assert lay["o"][0] == 1 and lay["o"][1][1].tolist() == list(range(16, 32))
    mlp = layout(ModelAdapter(tiny_model("phi3")), 0, "mlp")
    assert mlp["gate_up"][1][3].tolist() == [3, 67] and mlp["down"] == (1, mlp["down"][1])
    # gpt_neox: per head [q; k; v], no GQA
    axis, idx = layout(ModelAdapter(tiny_model("gpt_neox")), 0, "attn")["qkv"]
    assert idx.shape == (4, 24) and idx[1].tolist() == list(range(24, 48))
    # gpt2: c_attn's (out, in) view is [q; k; v], one head per group, GPT-2 MLP is 4 * hidden
    a = ModelAdapter(tiny_model("gpt2"))
    assert a.weight(a.linears(0)["qkv"]).shape == (96, 32)
    assert layout(a, 0, "attn")["qkv"][1][3].tolist() == list(range(24, 32)) + list(range(56, 64)) + list(
        range(88, 96)
    )
    assert units(a, 0) == (4, 128)
    # llama: separate q, k, v
    lay = layout(ModelAdapter(tiny_model("llama")), 0, "attn")
    assert sorted(lay) == ["k", "o", "q", "v"] and lay["k"][1][1].tolist() == list(range(8, 16))


# ---- (a) masks in place == physical removal ------------------------------------------------------------
@pytest.mark.parametrize("arch", SPLIT)
def test_masked_equals_shrunk(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    x = ids()
    dense = logits(model, x)
    masks = random_masks(adapter, seed=SPLIT.index(arch))
    with masked(adapter, masks):
        in_place = logits(model, x)
    assert not torch.allclose(in_place, dense, atol=1e-3)  # the masks change the function
    assert torch.equal(logits(model, x), dense)  # and are gone after the context
    counts = shrink(adapter, masks)
    assert torch.allclose(logits(model, x), in_place, atol=1e-5)
    for i, (m, c) in enumerate(zip(masks, counts)):
        assert (
            (c["kv_heads_after"], c["channels_after"])
            == (len(m.groups), len(m.channels))
            == units(adapter, i)
        )
        assert c["heads_after"] * c["kv_heads_before"] == c["heads_before"] * c["kv_heads_after"]
        assert c["parameters_after"] < c["parameters_before"]
    assert getattr(model.config, BLOCK_CONFIGS_KEY)[0]["intermediate_size"] == len(masks[0].channels)


def test_shrink_again_and_back_to_a_standard_config():
    """A shrunk model shrinks further (layouts come from the weights); once every block has the same
    shape again, the block list goes and the config's own keys say it."""
    model = tiny_model("phi3")  # its attention reads config.num_attention_heads: per-block config copies
    adapter = ModelAdapter(model)
    x = ids(1)
    shrink(adapter, [WidthMask([1], [*range(40)]), WidthMask(None, [*range(50)]), WidthMask(), WidthMask()])
    assert getattr(model.config, BLOCK_CONFIGS_KEY)[0] == {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 40,
    }
    assert adapter.part(0, "attn").config.num_attention_heads == 2 and model.config.num_attention_heads == 4
    masks = [WidthMask([0], [*range(30)])] + [WidthMask([1], [*range(1, 31)])] * 3
    with masked(adapter, masks):
        expected = logits(model, x)
    shrink(adapter, masks)
    assert torch.allclose(logits(model, x), expected, atol=1e-5)
    cfg = model.config
    assert not hasattr(cfg, BLOCK_CONFIGS_KEY)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (
        2,
        1,
        8,
        30,
    )
    assert all(adapter.part(i, "attn").config is cfg for i in range(4))


def test_masked_removes_its_hooks_on_error():
    model = tiny_model("llama")
    adapter = ModelAdapter(model)
    with pytest.raises(RuntimeError, match="boom"), masked(adapter, [WidthMask([0], [0, 1])] * 4):
        raise RuntimeError("boom")
    assert not any(m._forward_pre_hooks for m in model.modules())


# ---- (b) uniform shapes: a standard checkpoint ---------------------------------------------------------
@pytest.mark.parametrize("arch", SPLIT)
def test_uniform_export_loads_with_plain_transformers(arch, tmp_path, tokenizer):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    groups, channels = units(adapter, 0)
    keep_groups = None if arch in FIXED_HEAD_SIZE else list(range(1, groups))
    masks = [WidthMask(keep_groups, list(range(3, channels - 9)))] * adapter.num_blocks
    shrink(adapter, masks)
    x = ids(2)
    expected = logits(model, x)
    export(as_lm(model, tokenizer), tmp_path / "out", width_plan())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(plain.config, BLOCK_CONFIGS_KEY)
    assert ModelAdapter(plain).intermediate_size == channels - 12
    if keep_groups:
        assert ModelAdapter(plain).num_kv_heads == groups - 1
    assert torch.allclose(logits(plain, x), expected, atol=1e-5)


@pytest.mark.parametrize("arch", FIXED_HEAD_SIZE)
def test_fewer_heads_of_fixed_head_size_archs_need_the_block_list(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    shrink(adapter, [WidthMask([0, 2], None)] * adapter.num_blocks)
    assert model.config.num_attention_heads == 4  # the base shape the loader builds, then shrinks
    assert [b["num_attention_heads"] for b in getattr(model.config, BLOCK_CONFIGS_KEY)] == [2] * 4


# ---- (c) per-block shapes: reload in a fresh process ---------------------------------------------------
def test_nonuniform_export_reloads_in_a_fresh_process(tmp_path, tokenizer):
    x = ids(3)
    paths, expected = [], {}
    for n, arch in enumerate(("phi3", "gpt2", "gpt_neox", "qwen2")):
        model = tiny_model(arch)
        shrink(model, random_masks(ModelAdapter(model), seed=10 + n))
        assert hasattr(model.config, BLOCK_CONFIGS_KEY)
        out = tmp_path / arch
        export(as_lm(model, tokenizer), out, width_plan())
        paths.append(str(out))
        expected[str(out)] = logits(model, x)
    torch.save(x, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from layerprune.models.loading import load\n"
        "x = torch.load(sys.argv[1])\n"
        "out = {}\n"
        "for p in sys.argv[3:]:\n"
        "    lm = load(p, device='cpu', quiet=True)\n"
        "    with torch.no_grad():\n"
        "        out[p] = lm.model(x).logits\n"
        "    lm.model.save_pretrained(p + '-again')\n"
        "torch.save(out, sys.argv[2])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), *paths],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    for p in paths:
        assert torch.allclose(got[p], expected[p], atol=1e-5), p
        # the reloaded model saves as its transformers class, with the same block shapes
        first, again = (json.loads((Path(q) / "config.json").read_text()) for q in (p, p + "-again"))
        assert again["architectures"] == first["architectures"]
        assert again[BLOCK_CONFIGS_KEY] == first[BLOCK_CONFIGS_KEY]


@pytest.mark.parametrize("arch", SPLIT)
def test_load_shrunk_rebuilds_every_arch(arch, tmp_path):
    model = tiny_model(arch)
    shrink(model, random_masks(ModelAdapter(model), seed=20 + SPLIT.index(arch)))
    model.save_pretrained(tmp_path)
    again = load_shrunk(str(tmp_path), AutoConfig.from_pretrained(tmp_path))
    assert type(again).__name__ == type(model).__name__ and isinstance(again, type(model))
    x = ids(5)
    assert torch.allclose(logits(again, x), logits(model, x), atol=1e-5)
    with torch.no_grad():  # generation with a KV cache runs on the per-block shapes
        a = again.generate(x[:1], max_new_tokens=4, do_sample=False)
        b = model.generate(x[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_load_shrunk_is_strict(tmp_path, tokenizer):
    model = tiny_model("llama")
    shrink(model, random_masks(ModelAdapter(model), seed=5))
    export(as_lm(model, tokenizer), tmp_path / "m", width_plan())
    x = ids(4)
    assert torch.allclose(
        logits(load_shrunk(str(tmp_path / "m"), AutoConfig.from_pretrained(tmp_path / "m")), x),
        logits(model, x),
        atol=1e-5,
    )
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    doc[BLOCK_CONFIGS_KEY][0]["intermediate_size"] -= 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(LayerpruneError, match="do not have the shapes"):
        load_shrunk(str(tmp_path / "m"), AutoConfig.from_pretrained(tmp_path / "m"))
    doc[BLOCK_CONFIGS_KEY][0]["num_attention_heads"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(LayerpruneError, match="does not fit"):
        load_shrunk(str(tmp_path / "m"), AutoConfig.from_pretrained(tmp_path / "m"))


# ---- (d) parameter counts ---------------------------------------------------------------------------------
# Per removed KV group and per removed channel, by hand (hidden H = 32, head_dim d = 8):
#   llama / phi3: g = 2 query heads per group: q rows + o columns 2*g*d*H, k and v rows 2*d*H
#                 = 6*8*32 = 1536; a channel: gate row, up row, down column = 3*H = 96.
#   qwen2: as llama plus q, k, v biases (g + 2) * d = 32 -> 1568.
#   opt / gpt2 / gpt_neox: one head per group: q, k, v rows 3*d*H + their biases 3*d, o columns d*H
#                 = 4*8*32 + 24 = 1048; a channel: up row + its bias + down column = 2*H + 1 = 65.
PER_UNIT = {
    "llama": (1536, 96),
    "phi3": (1536, 96),
    "qwen2": (1568, 96),
    "opt": (1048, 65),
    "gpt2": (1048, 65),
    "gpt_neox": (1048, 65),
}


@pytest.mark.parametrize("arch", sorted(PER_UNIT))
def test_parameter_counts_by_hand(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter(model)
    before = sum(p.numel() for p in model.parameters())
    masks = random_masks(adapter, seed=7)
    sizes = [units(adapter, i) for i in range(adapter.num_blocks)]
    counts = shrink(adapter, masks)
    per_group, per_channel = PER_UNIT[arch]
    removed = 0
    for (g, c), m, n in zip(sizes, masks, counts):
        r = (g - len(m.groups)) * per_group + (c - len(m.channels)) * per_channel
        assert n["parameters_before"] - n["parameters_after"] == r
        removed += r
    assert sum(p.numel() for p in model.parameters()) == before - removed


# ---- (e) bad input -------------------------------------------------------------------------------------------
def test_bad_masks():
    adapter = ModelAdapter(tiny_model("llama"))
    full = [WidthMask()] * 4
    with pytest.raises(LayerpruneError, match="removes every KV group"):
        shrink(adapter, [WidthMask([], None)] + full[1:])
    with pytest.raises(LayerpruneError, match="removes every MLP channel"):
        shrink(adapter, full[:3] + [WidthMask(None, [])])
    with pytest.raises(LayerpruneError, match="3 width masks for 4 blocks"):
        shrink(adapter, full[:3])
    with pytest.raises(LayerpruneError, match="out of range"):
        shrink(adapter, [WidthMask([0, 2], None)] + full[1:])
    with pytest.raises(LayerpruneError, match="repeat"):
        shrink(adapter, [WidthMask(None, [1, 1])] + full[1:])
    assert units(adapter, 0) == (2, 64)  # nothing was changed by the refused calls


def test_mamba_has_no_width():
    adapter = ModelAdapter(tiny_model("mamba"))
    for call in (
        lambda: layout(adapter, 0, "attn"),
        lambda: shrink(adapter, [WidthMask()] * 4),
        lambda: masked(adapter, [WidthMask()] * 4).__enter__(),
        lambda: adapter.num_heads,
    ):
        with pytest.raises(LayerpruneError, match="no attention / MLP split"):
            call()


def test_masked_with_an_empty_list_removes_the_whole_part():
    """Deployable plans remove whole parts: under `masked` an empty list is the part contributing
    nothing, bias included; the reference zeroes the part's output projection, weight and bias."""
    model = tiny_model("qwen2")  # biased q, k, v
    adapter = ModelAdapter(model)
    with torch.no_grad():
        for i in range(adapter.num_blocks):
            adapter.linears(i)["o"].bias = torch.nn.Parameter(torch.randn(model.config.hidden_size))
    x = ids(4)
    masks = [WidthMask()] * 4
    masks[1], masks[2] = WidthMask([], None), WidthMask(None, [])
    with masked(adapter, masks):
        got = logits(model, x)
    with torch.no_grad():
        for layer in (adapter.linears(1)["o"], adapter.linears(2)["down"]):
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    assert torch.allclose(got, logits(model, x), atol=1e-6)
