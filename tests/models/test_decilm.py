"""DeciLM / Nemotron-NAS: deployable width plans, the export, and reading checkpoints from elsewhere."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from layerprune.checkpoint import export
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.decilm import ffn_mult, to_decilm
from layerprune.models.loading import FIXTURE_DIR, LoadedModel, load
from layerprune.models.shrink import shrink
from layerprune.models.width import WidthMask
from layerprune.models.width_decisions import BlockBudget, Deployable, budgets
from layerprune.planners.width import make_plan
from layerprune.pruners.width import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")

# The per-block keys of NVIDIA's released Puzzle checkpoints (Nemotron-51B / 49B / 253B), written out
# here from their config.json files rather than imported from the code under test.
RELEASED_ATTENTION = {
    "n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "window_length", "num_sink_tokens",
    "use_prefill_window_in_sink_attention", "unshifted_sink",
}  # fmt: skip
RELEASED_FFN = {"ffn_mult", "no_op", "replace_with_linear", "sparsify"}
# Their top-level keys, less auto_map and _name_or_path (we ship no remote code) and plus pad_token_id.
RELEASED_TOP = {
    "architectures", "attention_bias", "attention_dropout", "block_configs", "bos_token_id", "eos_token_id",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings", "mlp_bias",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pretraining_tp",
    "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "use_cache", "vocab_size", "pad_token_id",
}  # fmt: skip
CLASSES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
}


def engine_width(mult: float, hidden: int) -> int:
    """vLLM's / llama.cpp's / mlx-lm's formula, spelled out: int(2 m h / 3) rounded up to 256."""
    n = int(2 * mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def tiny(arch: str, layers: int = 5, intermediate: int = 768, seed: int = 0, vocab: int = 128):
    config_cls, model_cls = CLASSES[arch]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)  # fmt: skip
    if arch == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():  # random, not zero, norms and biases: a dropped or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(FIXTURE_DIR)


def ids(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_ffn_mult_round_trips_every_multiple_of_256():
    for hidden in (64, 576, 896, 960, 2048, 3072, 4096, 5120, 8192):
        for width in range(256, 8 * hidden + 1, 256):
            m = ffn_mult(width, hidden)
            assert engine_width(m, hidden) == width
            assert engine_width(round(m, 6), hidden) == width  # mlx-lm rounds it to 6 decimals


@pytest.mark.parametrize("arch", sorted(CLASSES))
def test_export_of_mixed_blocks_reloads_with_identical_logits(arch, tmp_path, tokenizer):
    model = tiny(arch)
    adapter = ModelAdapter(model)
    keep = [list(range(512)), list(range(256, 768)), None, None, list(range(256))]  # unsorted is fine too
    shrink(adapter, [WidthMask(None, k) for k in keep])
    deleted = to_decilm(adapter, {1: {"attn"}, 3: {"attn", "mlp"}, 4: {"attn"}})
    assert deleted == [3]
    x = ids(1)
    expected = logits(model, x)
    export(LoadedModel("tiny", model, tokenizer, adapter, None), tmp_path / "out", None)

    doc = json.loads((tmp_path / "out" / "config.json").read_text())
    assert doc["architectures"] == ["DeciLMForCausalLM"] and doc["model_type"] == "nemotron-nas"
    assert doc["intermediate_size"] is None and doc["num_key_value_heads"] is None
    assert set(doc) == RELEASED_TOP
    assert doc["num_hidden_layers"] == 4 and len(doc["block_configs"]) == 4
    for b in doc["block_configs"]:
        assert set(b) == {"attention", "ffn"}
        assert set(b["attention"]) == RELEASED_ATTENTION and set(b["ffn"]) == RELEASED_FFN
    attn = [b["attention"] for b in doc["block_configs"]]
    assert [a["no_op"] for a in attn] == [False, True, False, True]
    assert [a["n_heads_in_group"] for a in attn] == [2, None, 2, None]  # 4 query heads over 2 KV heads
    widths = [engine_width(b["ffn"]["ffn_mult"], 64) for b in doc["block_configs"]]
    assert widths == [512, 512, 768, 256]
    assert doc["attention_bias"] == (arch == "qwen2")

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith(("model.layers.1.self_attn.", "model.layers.3.self_attn.")) for n in names)
    assert "model.layers.1.input_layernorm.weight" not in names  # no attention, no norm in front of it
    assert "model.layers.0.input_layernorm.weight" in names
    assert not any(n.startswith("model.layers.4.") for n in names)  # 5 blocks, one deleted
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:  # old block 4 is block 3 now
        assert f.get_slice("model.layers.3.mlp.down_proj.weight").get_shape() == [64, 256]
    if arch == "qwen2":  # one attention_bias flag: o gets a (zero) bias beside q, k, v's
        assert "model.layers.0.self_attn.o_proj.bias" in names

    lm = load(str(tmp_path / "out"), quiet=True)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(lm.model, x), expected)


def test_a_decilm_folders_tokenizer_is_read_without_transformers_warnings(tmp_path, tokenizer, caplog):
    """Its tokenizer alone (`eval FILE.gguf --engine llama.cpp`, `--imatrix`): transformers reads the
    nemotron-nas config.json as a generic one first and warns twice; the folder is known for what it is."""
    from layerprune.models.loading import read_tokenizer

    adapter = ModelAdapter(tiny("llama"))
    to_decilm(adapter, {1: {"attn"}})
    export(LoadedModel("tiny", adapter.model, tokenizer, adapter, None), tmp_path / "out", None)
    caplog.clear()
    with caplog.at_level("WARNING"):
        tok = read_tokenizer(str(tmp_path / "out"), None, "out")
    assert tok("a b").input_ids == tokenizer("a b").input_ids
    assert not [r.getMessage() for r in caplog.records if "nemotron-nas" in r.getMessage()]


def test_a_hand_written_decilm_checkpoint_loads(tmp_path, tokenizer):
    """A DeciLM checkpoint from elsewhere: fewer KV heads than the base (all query heads kept), an
    attention-free block, an MLP-free block. The reference is plain transformers' dense Llama with
    the same function: KV head 0 copied into head 1, removed parts' output projections zeroed."""
    dense = tiny("llama", layers=4, intermediate=512)
    state = {k: v.clone() for k, v in dense.state_dict().items() if k != "lm_head.weight"}
    d = 16  # head size: 64 / 4
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:d]
    state["model.layers.0.self_attn.v_proj.weight"] = state["model.layers.0.self_attn.v_proj.weight"][:d]
    for k in [
        k for k in state if k.startswith(("model.layers.2.self_attn.", "model.layers.2.input_layernorm"))
    ]:
        del state[k]
    for k in [
        k for k in state if k.startswith(("model.layers.3.mlp.", "model.layers.3.post_attention_layernorm"))
    ]:
        del state[k]
    for k in [k for k in state if k.startswith("model.layers.1.mlp.")]:
        state[k] = state[k][:256] if "down" not in k else state[k][:, :256]
    attention = dict.fromkeys(RELEASED_ATTENTION)
    attention.update(no_op=False, replace_with_linear=False, unshifted_sink=False,
                     use_prefill_window_in_sink_attention=False)  # fmt: skip
    ffn = {"ffn_mult": 12.0, "no_op": False, "replace_with_linear": False, "sparsify": None}
    blocks = [
        {"attention": {**attention, "n_heads_in_group": 4}, "ffn": ffn},
        {"attention": {**attention, "n_heads_in_group": 2}, "ffn": {**ffn, "ffn_mult": 6.0}},
        {"attention": {**attention, "no_op": True}, "ffn": ffn},
        {"attention": {**attention, "n_heads_in_group": 2}, "ffn": {**ffn, "ffn_mult": None, "no_op": True}},
    ]
    config = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "block_configs": blocks,
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 128,
        "intermediate_size": None, "num_key_value_heads": None, "rms_norm_eps": dense.config.rms_norm_eps,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 64, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
    }  # fmt: skip
    state["lm_head.weight"] = dense.state_dict()["lm_head.weight"].clone()
    folder = tmp_path / "nas"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)

    lm = load(str(folder), quiet=True)
    with torch.no_grad():  # the dense reference
        sd = dense.model.layers
        sd[0].self_attn.k_proj.weight[d:] = sd[0].self_attn.k_proj.weight[:d]
        sd[0].self_attn.v_proj.weight[d:] = sd[0].self_attn.v_proj.weight[:d]
        sd[1].mlp.down_proj.weight[:, 256:] = 0
        sd[2].self_attn.o_proj.weight.zero_()
        sd[3].mlp.down_proj.weight.zero_()
    x = ids(2)
    assert torch.allclose(logits(lm.model, x), logits(dense, x), atol=1e-5)


def test_a_damaged_decilm_config_is_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    config = {"model_type": "nemotron-nas", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
              "vocab_size": 128, "block_configs": [{"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 2.0}}]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerpruneError, match="n_heads_in_group is 3; it must divide 4"):
        load(str(folder), quiet=True)


# ---- deployable decisions ----------------------------------------------------------------------------
def brute_force_best(blocks, rule, goal):
    menus = [rule.options(i, b) for i, b in enumerate(blocks)]
    costs = [[g * b.group_params + c * b.channel_params for g, c in m] for m, b in zip(menus, blocks)]
    return min(abs(sum(c) - goal) for c in itertools.product(*costs))


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.45])
def test_deployable_decisions_meet_the_target_as_closely_as_any_combination(target):
    blocks = [BlockBudget(groups=2, group_params=100, channels=768, channel_params=3) for _ in range(4)]
    rule = Deployable(256)
    total = sum(b.params for b in blocks)
    rates = [target * 1.6, target * 0.4, target, target]
    decision = rule.decision(rates, blocks, target=target)
    for i, (o, b) in enumerate(zip(decision, blocks)):
        assert o in rule.options(i, b)
        assert o[0] in (0, b.groups) and (b.channels - o[1]) % 256 == 0
    assert decision[0][0] == 0  # block 0 keeps its attention
    got = sum(g * b.group_params + c * b.channel_params for (g, c), b in zip(decision, blocks))
    assert abs(got - target * total) == pytest.approx(brute_force_best(blocks, rule, target * total))


def test_options_never_keep_attention_without_an_mlp():
    b = BlockBudget(groups=3, group_params=10, channels=512, channel_params=1)
    for i in (0, 1):
        for g, c in Deployable(256).options(i, b):
            assert not (g == 0 and c == b.channels)
            assert i > 0 or g == 0


def tiny_lm(tokenizer, arch="llama", layers=5, intermediate=768):
    model = tiny(arch, layers=layers, intermediate=intermediate, vocab=len(tokenizer))
    return LoadedModel("tiny", model, tokenizer, ModelAdapter(model), None)


@pytest.mark.parametrize("allocation", ["uniform", "search"])
def test_a_deployable_plan_applies_exports_and_reloads(allocation, tmp_path, tokenizer):
    from layerprune.data import calibration

    lm = tiny_lm(tokenizer)
    w = calibration(lm, "fixture:val", samples=2, seqlen=16, seed=0, kind="depth")
    extra = (
        dict(iterations=2, population=6, crossovers=2, mutations=2, fitness_windows=w)
        if allocation == "search"
        else {}
    )
    plan = make_plan(lm, 0.2, allocation, pruner="magnitude-sp", deploy="decilm", progress=False, **extra)
    assert plan.deploy == "decilm" and plan.channel_multiple == 256
    blocks = budgets(lm.adapter)
    assert abs(plan.params["achieved"] - 0.2) <= 0.005
    assert plan.attn[0] == 0 and set(plan.attn) <= {0, 1}
    for a, m, b in zip(plan.attn, plan.mlp, blocks):
        kept = b.channels - round(m * b.channels)
        assert kept % 256 == 0 and (kept > 0 or a == 1)
    x = ids(3)
    report = apply_plan(lm, plan, None, progress=False)
    assert report["format"] == "decilm"
    expected = logits(lm.model, x)
    export(lm, tmp_path / "out", plan)
    again = load(str(tmp_path / "out"), quiet=True)
    assert torch.equal(logits(again.model, x), expected)


def test_an_unmeetable_target_names_one_that_can_be_met(tokenizer):
    lm = tiny_lm(tokenizer, layers=2, intermediate=512)  # per block: MLP steps of 256 channels
    with pytest.raises(LayerpruneError, match=r"use --width (0\.\d+)") as e:
        make_plan(lm, 0.05, "uniform", pruner="magnitude-sp", deploy="decilm", progress=False)
    assert len(str(e.value).splitlines()) == 1
    suggested = float(str(e.value).rsplit("--width ", 1)[1].split()[0].rstrip(";"))
    plan = make_plan(lm, suggested, "uniform", pruner="magnitude-sp", deploy="decilm", progress=False)
    assert plan.params["achieved"] == pytest.approx(suggested, abs=1e-4)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(deploy="decilm", channel_multiple=100), "multiple of 256"),
        (dict(channel_multiple=512), "add --deploy decilm"),
        (dict(deploy="decilm", pruner="flap"), "bias compensation"),
        (dict(deploy="vllm"), "the one deployable format is decilm"),
    ],
)
def test_deploy_requests_refused_before_any_data(kw, match, tokenizer):
    lm = tiny_lm(tokenizer)
    with pytest.raises(LayerpruneError, match=match):
        make_plan(lm, 0.2, "uniform", progress=False, **kw)


def test_architectures_that_are_not_llama_blocks_are_refused(tokenizer):
    from layerprune.models.tiny import tiny_model

    model = tiny_model("opt")
    lm = LoadedModel("tiny", model, tokenizer, ModelAdapter(model), None)
    with pytest.raises(LayerpruneError, match="DeciLM blocks are Llama blocks; opt"):
        make_plan(lm, 0.2, "uniform", pruner="magnitude-sp", deploy="decilm", progress=False)


def test_encoded_decisions_decode_to_themselves():
    """A deployable search starts from the allocations' deployable decisions: their genomes decode back."""
    import random

    rng = random.Random(0)
    blocks = [BlockBudget(groups=3, group_params=300, channels=1536, channel_params=3) for _ in range(6)]
    table = {
        "groups": [[rng.random() for _ in range(3)] for _ in blocks],
        "channels": [[rng.random() * 0.2 for _ in range(1536)] for _ in blocks],
    }
    rule = Deployable(256)
    for _ in range(20):
        decision = [rng.choice(rule.options(i, b)) for i, b in enumerate(blocks)]
        rates = rule.encode(decision, blocks, table)
        assert rule.decision(rates, blocks, table, position=True) == decision


def test_a_boolean_n_heads_in_group_is_refused_as_the_vllm_config_class_refuses_it(tmp_path):
    """JSON `true` is an int to Python (1 KV group per head): the loader, like the config class vLLM reads
    (serving/nemotron_nas_config.py), takes it for the malformed entry it is."""
    folder = tmp_path / "bad"
    folder.mkdir()
    config = {"model_type": "nemotron-nas", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
              "vocab_size": 128, "block_configs": [{"attention": {"n_heads_in_group": True}, "ffn": {"ffn_mult": 2.0}}]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerpruneError, match="n_heads_in_group is True; it must divide 4"):
        load(str(folder), quiet=True)
