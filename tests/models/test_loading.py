import pytest
import torch
from transformers import BertConfig

from layerprune.errors import LayerpruneError
from layerprune.models.loading import load, load_config, model_fingerprint, resolve
from layerprune.models.tiny import tiny_model


def test_resolve_errors(tmp_path):
    with pytest.raises(LayerpruneError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    f = tmp_path / "weights.bin"
    f.write_text("x")
    with pytest.raises(LayerpruneError, match="is a file"):
        resolve(str(f))
    with pytest.raises(LayerpruneError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(LayerpruneError, match="hub is unreachable"):
        resolve("someorg/some-model")  # HF_HUB_OFFLINE=1 in tests


def test_not_a_causal_lm_and_unsupported(tmp_path):
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(LayerpruneError, match="not a causal LM"):
        load_config(str(tmp_path / "bert"))
    from transformers import BloomConfig

    BloomConfig(n_layer=1).save_pretrained(tmp_path / "bloom")
    with pytest.raises(LayerpruneError, match="not supported; supported:"):
        load(str(tmp_path / "bloom"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(LayerpruneError, match="cannot read the config"):
        load_config(str(tmp_path / "broken"))


def test_fingerprint_ignores_dtype_but_sees_pruning():
    model = tiny_model("llama")
    fp = model_fingerprint(model)
    bf16 = tiny_model("llama").to(torch.bfloat16).float()  # the values every bf16 load would have
    model_bf = tiny_model("llama")
    with torch.no_grad():
        for p in model_bf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert model_fingerprint(bf16) == model_fingerprint(model_bf)
    assert model_fingerprint(tiny_model("llama")) == fp
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = 0.0  # one weight pruned
    assert model_fingerprint(model) != fp
    assert model_fingerprint(tiny_model("llama", seed=1)) != fp


def test_fixture_loads_in_float32_on_cpu(fixture_lm):
    assert next(fixture_lm.model.parameters()).dtype == torch.float32
    assert fixture_lm.adapter.num_blocks == 12
    assert fixture_lm.adapter.context_length == 256
    cfg = fixture_lm.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 2)
    assert cfg.tie_word_embeddings


def test_fingerprint_of_a_tensor_past_float32_integer_precision():
    """linspace in float32 rounds 65535999 up to 65536000: the index must stay inside the tensor."""

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_model("llama", num_layers=1).config
            self.w = torch.nn.Parameter(torch.zeros(65_536_000, dtype=torch.int8), requires_grad=False)

    m = Big()
    a = model_fingerprint(m)  # raised IndexError (index 65536000 out of bounds) before the clamp
    m.w.data[-1] = 1
    assert model_fingerprint(m) != a


def test_mps_is_refused_in_one_line(cli):
    """MPS has no float64 (the losses and statistics accumulate in it): refused before any load,
    whether or not this machine has MPS, never a crash deep inside a pruner."""
    from layerprune.models.loading import check_device

    for device in ("mps", "mps:0"):
        with pytest.raises(LayerpruneError, match="MPS is not supported.*use --device cpu"):
            check_device(device)
    r = cli("eval", "fixture", "--device", "mps", "--ppl", "fixture:test", "--seqlen", "32")
    assert (
        r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "MPS is not supported" in r.stderr
    )
