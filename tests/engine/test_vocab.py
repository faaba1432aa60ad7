"""Losses over the vocabulary a chunk of tokens at a time equal the model's own logits in float64."""

import pytest
import torch
import transformers as tf

import layerprune.engine.vocab as vocab
from layerprune.models.adapter import ModelAdapter
from layerprune.models.registry import ArchSpec
from layerprune.models.tiny import ARCHS, tiny_model


def float64_nll(model, x):
    """Independent: the model's own forward, log-softmax of its logits in float64, per window."""
    with torch.no_grad():
        logits = model(input_ids=x, use_cache=False).logits.double()
    return -torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1).sum(1)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(vocab, "MAX_CHUNK", 5)  # chunks of 5 tokens: they split windows


@pytest.mark.parametrize("arch", ARCHS)
def test_window_nll_equals_the_models_logits(arch, small_chunks):
    model = tiny_model(arch, num_layers=2)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (3, 12))
    with torch.no_grad():
        got = vocab.window_nll(adapter, x)
    assert got.dtype == torch.float64
    assert torch.allclose(got, float64_nll(model, x), rtol=1e-6, atol=0)


def test_fixture_nll_and_tied_head(fixture_lm, small_chunks):
    """The bundled model: a trained one, its output embedding tied to the input embedding."""
    model, adapter = fixture_lm.model, fixture_lm.adapter
    assert adapter.head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    x = torch.randint(3, adapter.vocab_size, (2, 33))
    with torch.no_grad():
        got = vocab.window_nll(adapter, x)
    assert torch.allclose(got, float64_nll(model, x), rtol=1e-6, atol=0)


def _llama_like_spec(name: str, norms: dict, **logits) -> ArchSpec:
    linears = {r: f"self_attn.{r}_proj" for r in "qkvo"} | {
        r: f"mlp.{r}_proj" for r in ("gate", "up", "down")
    }
    return ArchSpec(name, (name,), "model.layers", linears, "self_attn", "mlp", norms, **logits)


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip


@pytest.mark.parametrize(
    "config, spec",
    [
        (  # Cohere multiplies the logits by logit_scale
            tf.CohereConfig(**SMALL, logit_scale=0.3),
            _llama_like_spec("cohere", {"input_layernorm": "attn"}, logit_scale_key="logit_scale"),
        ),
        (  # Granite divides them by logits_scaling
            tf.GraniteConfig(**SMALL, logits_scaling=4.0),
            _llama_like_spec(
                "granite",
                {"input_layernorm": "attn", "post_attention_layernorm": "mlp"},
                logit_divisor_key="logits_scaling",
            ),
        ),
    ],
)
def test_logit_scaling_of_other_architectures(config, spec, small_chunks):
    """What a forward does between the output embedding and the logits is the spec's to state:
    with it the chunked loss is the model's; without it, it is not (the test exercises the key)."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    x = torch.randint(3, 128, (2, 10))
    expected = float64_nll(model, x)
    with torch.no_grad():
        got = vocab.window_nll(ModelAdapter(model, spec), x)
        plain = vocab.window_nll(ModelAdapter(model, _llama_like_spec("plain", spec.norms)), x)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(plain, expected, rtol=1e-3)


def test_token_nll_without_a_log_softmax_copy(small_chunks):
    logits = torch.randn(3, 9, 50)
    ids = torch.randint(0, 50, (3, 9))
    expected = -torch.log_softmax(logits.double()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)
    assert torch.allclose(vocab.token_nll(logits, ids), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_head_kl_equals_float64_by_hand(arch, small_chunks):
    """KL(dense || changed) from hidden states through the shared head, against float64 softmaxes of
    the two models' own logits (Gemma 2: softcapped logits)."""
    model = tiny_model(arch, num_layers=2)
    adapter = ModelAdapter(model)
    x = torch.randint(3, 128, (3, 11))
    with torch.no_grad():
        dense_h = adapter.head_input(x)
        p = torch.log_softmax(model(input_ids=x, use_cache=False).logits.double()[:, :-1], -1)
        w = adapter.weight(adapter.linears(1)[adapter.roles[-1]])
        w.add_(0.1 * torch.randn_like(w))  # the "compressed" model: a block's weights changed, not the head
        q = torch.log_softmax(model(input_ids=x, use_cache=False).logits.double()[:, :-1], -1)
        got = float(vocab.head_kl(adapter, dense_h, adapter.head_input(x)))
    expected = float((p.exp() * (p - q)).sum())
    assert expected > 1e-3
    assert got == pytest.approx(expected, rel=1e-5)


def test_chunk_is_bounded_by_bytes_not_by_the_batch():
    assert vocab.chunk_tokens(128 * 1024) * 128 * 1024 * 4 <= vocab.CHUNK_BYTES
    assert vocab.chunk_tokens(256 * 1024) == vocab.CHUNK_BYTES // (256 * 1024 * 4)
    assert vocab.chunk_tokens(64) == vocab.MAX_CHUNK
    assert vocab.chunk_tokens(10**9) == 1
