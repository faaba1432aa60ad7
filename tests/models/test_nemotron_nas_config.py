"""Our nemotron-nas config class (what the vLLM plugin registers) against what our exports write and
against a config from elsewhere with the released key set; the plugin imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from test_decilm import RELEASED_ATTENTION, RELEASED_FFN, RELEASED_TOP, engine_width, tiny

from layerprune.checkpoint import export
from layerprune.models.adapter import ModelAdapter
from layerprune.models.decilm import to_decilm
from layerprune.models.loading import FIXTURE_DIR, LoadedModel, load
from layerprune.models.shrink import shrink
from layerprune.models.width import WidthMask
from layerprune.serving.nemotron_nas_config import NemotronNasConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_importing_the_plugin_imports_neither_torch_nor_the_pipeline():
    code = (
        "import sys, layerprune.serving.vllm_plugin, layerprune.serving.nemotron_nas\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'safetensors')"
        " or m.startswith(('layerprune.models', 'layerprune.api', 'layerprune.engine')))\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _export(model, tokenizer, folder, removed: dict, keep: list):
    adapter = ModelAdapter(model)
    shrink(adapter, [WidthMask(None, k) for k in keep])
    to_decilm(adapter, removed)
    export(LoadedModel("tiny", model, tokenizer, adapter, None), folder, None)
    return json.loads((folder / "config.json").read_text())


def _tensor_shapes(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _check_against_weights(config, folder, doc):
    """The class's attributes, read the way vLLM's DeciLMForCausalLM reads them, against the tensors
    the export holds (the independent side): KV heads from k_proj's rows, MLP width from gate_proj's."""
    shapes = _tensor_shapes(folder)
    H, hidden = doc["num_attention_heads"], doc["hidden_size"]
    head = hidden // H
    for i, block in enumerate(config.block_configs):
        k = shapes.get(f"model.layers.{i}.self_attn.k_proj.weight")
        assert block.attention.no_op == (k is None)
        if k is not None:
            assert H // block.attention.n_heads_in_group == k[0] // head
        gate = shapes.get(f"model.layers.{i}.mlp.gate_proj.weight")
        assert block.ffn.no_op == (gate is None)
        if gate is not None:
            assert engine_width(block.ffn.ffn_mult, hidden) == gate[0]


@pytest.mark.parametrize(
    "removed, keep",
    [
        ({}, [list(range(768))] * 5),  # every block whole: ffn_mult 18.0 each
        ({2: {"attn"}, 4: {"attn"}}, [list(range(512)), list(range(256, 768)), None, list(range(256)), None]),
        (
            {1: {"attn", "mlp"}, 3: {"attn"}},
            [list(range(256)), None, list(range(768)), None, list(range(512))],
        ),
    ],
    ids=["dense", "attention-removed", "block-deleted"],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_block_config_our_exports_write_round_trips(arch, removed, keep, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_DIR)
    folder = tmp_path / "out"
    doc = _export(tiny(arch), tokenizer, folder, removed, keep)
    config = NemotronNasConfig.from_pretrained(folder)
    _check_against_weights(config, folder, doc)
    written = config.to_dict()
    assert written["block_configs"] == doc["block_configs"]
    for key in RELEASED_TOP - {"torch_dtype", "transformers_version"}:
        assert written[key] == doc[key], key
    config.save_pretrained(tmp_path / "again")  # what vLLM's engine gets back when it rereads it
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == doc["block_configs"] and again["model_type"] == "nemotron-nas"


def test_a_deployable_plan_on_the_fixture_round_trips(tmp_path):
    """A real plan (`--deploy decilm`, attention removed where the scores say) on the bundled model."""
    from layerprune.data import calibration
    from layerprune.planners.width import make_plan
    from layerprune.pruners.width import apply_plan

    lm = load("fixture", device="cpu", quiet=True)
    w = calibration(lm, "fixture:val", samples=2, seqlen=32, seed=0)
    plan = make_plan(lm, 0.2917, "uniform", pruner="magnitude-sp", deploy="decilm", progress=False)
    apply_plan(lm, plan, w, progress=False)
    export(lm, tmp_path / "out", plan)
    doc = json.loads((tmp_path / "out" / "config.json").read_text())
    config = NemotronNasConfig.from_pretrained(tmp_path / "out")
    _check_against_weights(config, tmp_path / "out", doc)
    assert config.to_dict()["block_configs"] == doc["block_configs"]


def _released(**attention) -> dict:
    """A Nemotron-51B-style config.json, written out by hand with the released key set."""
    a = {"n_heads_in_group": 8, "no_op": False, "num_sink_tokens": None, "replace_with_linear": False,
         "sparsify": None, "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
         "window_length": None, **attention}  # fmt: skip
    f = {"ffn_mult": 2.625, "no_op": False, "replace_with_linear": False, "sparsify": None}
    blocks = [
        {"attention": a, "ffn": f},
        {"attention": {**a, "n_heads_in_group": 64, "window_length": 4096}, "ffn": {**f, "ffn_mult": 1.3125}},
        {"attention": {**a, "n_heads_in_group": None, "no_op": True}, "ffn": {**f, "sparsify": ["decoder"]}},
        {
            "attention": {**a, "n_heads_in_group": None, "replace_with_linear": True},
            "ffn": {**f, "ffn_mult": 5.25},
        },
    ]
    return {
        "architectures": ["DeciLMForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "block_configs": blocks, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": None,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "nemotron-nas",
        "num_attention_heads": 64, "num_hidden_layers": 4, "num_key_value_heads": None, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.2",
        "use_cache": True, "vocab_size": 128256,
    }  # fmt: skip


def test_a_released_style_config_round_trips_with_its_key_set(tmp_path):
    doc = _released()
    assert set(doc) == RELEASED_TOP - {"pad_token_id"}
    for b in doc["block_configs"]:
        assert set(b["attention"]) == RELEASED_ATTENTION and set(b["ffn"]) == RELEASED_FFN
    (tmp_path / "config.json").write_text(json.dumps(doc))
    config = NemotronNasConfig.from_pretrained(tmp_path)
    blocks = config.block_configs
    assert [b.attention.no_op for b in blocks] == [False, False, True, False]
    assert [b.attention.n_heads_in_group for b in blocks[:2]] == [8, 64]
    assert blocks[1].attention.window_length == 4096 and blocks[3].attention.replace_with_linear
    assert blocks[2].ffn.sparsify == ["decoder"]
    assert [engine_width(b.ffn.ffn_mult, 8192) for b in blocks] == [14336, 7168, 14336, 28672]
    # RoPE as transformers 5 and vLLM read it: the scaling dict with the theta in it
    assert config.rope_parameters == {**doc["rope_scaling"], "rope_theta": 500000.0}
    written = config.to_dict()
    for key in RELEASED_TOP - {"pad_token_id", "torch_dtype", "transformers_version"}:
        assert written[key] == doc[key], key
    assert str(written["dtype"]).removeprefix("torch.") == "bfloat16"


@pytest.mark.parametrize(
    "block, match",
    [
        (
            {"attention": {"n_heads_in_group": 8, "noop": True}, "ffn": {"ffn_mult": 1.0}},
            "outside the nemotron-nas set: noop",
        ),
        (
            {"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 1.0}},
            "n_heads_in_group is 3: it must divide",
        ),
        ({"attention": {"n_heads_in_group": 8}, "ffn": {}}, "ffn_mult is None"),
        ({"attention": {"n_heads_in_group": 8}}, "exactly 'attention' and 'ffn'"),
    ],
)
def test_a_config_the_engines_would_misread_is_refused(block, match, tmp_path):
    doc = {**_released(), "num_hidden_layers": 1, "block_configs": [block]}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        NemotronNasConfig.from_pretrained(tmp_path)


def test_the_layer_count_must_match_the_blocks(tmp_path):
    doc = {**_released(), "num_hidden_layers": 5}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="4 entries for num_hidden_layers = 5"):
        NemotronNasConfig.from_pretrained(tmp_path)
