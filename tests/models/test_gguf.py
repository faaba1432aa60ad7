"""GGUF input: a tiny Llama written to a .gguf here, as llama.cpp's converter lays it out, loads
through layerprune with the logits of the model it was written from; the conversion is cached."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import layerprune as lp
from layerprune.errors import LayerpruneError
from layerprune.models.loading import FIXTURE_DIR


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows from HF's rotate-half layout to interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model: LlamaForCausalLM, tokenizer) -> None:
    """The GGUF file of `model`: llama.cpp tensor names and metadata keys, F32 tensors, the
    tokenizer as a byte-level BPE ('gpt2') vocabulary with its merges."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(True)  # the fixture tokenizer puts BOS before a text
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(FIXTURE_DIR)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(path, model, tok)
    return path, model, tok


def test_a_gguf_loads_with_the_logits_of_the_model_it_was_written_from(tiny_gguf, tmp_path, monkeypatch):
    path, model, tok = tiny_gguf
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    lm = lp.load(str(path), device="cpu", quiet=True)
    ids = tok("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert lm.tokenizer(["Genesis 1:1"]).input_ids == tok(["Genesis 1:1"]).input_ids
    # converted once into the cache, as a plain transformers folder that records its source
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(folders) == 1 and lm.path == folders[0]
    assert lm.origin["quantization"] == "F32" and lm.origin["file"] == path.name
    plain = LlamaForCausalLM.from_pretrained(folders[0])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # the cache is reused: a second load neither converts nor changes the fingerprint
    stamp = (folders[0] / "model.safetensors").stat().st_mtime_ns
    again = lp.load(str(path), device="cpu", quiet=True)
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.fingerprint == lm.fingerprint
    # an export says where the weights came from
    from layerprune.api import export

    out = export(again, tmp_path / "export", None)
    report = json.loads((out / "report.json").read_text())
    assert report["base_model"]["weights"]["sha256"] == lm.origin["sha256"]
    assert "GGUF `tiny-llama.F32.gguf`" in (out / "README.md").read_text()
    assert lp.load(str(out), device="cpu", quiet=True).origin == lm.origin


def test_max_memory_works_on_a_converted_gguf(tiny_gguf, tmp_path, monkeypatch):
    path, model, tok = tiny_gguf
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    lm = lp.load(str(path), device="cpu", quiet=True, max_memory="4.5MB")
    assert lm.offloaded
    whole = lp.load(str(path), device="cpu", quiet=True)
    assert lm.fingerprint == whole.fingerprint


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not a gguf at all, just some bytes" * 10, "is not a readable GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\x00" * 5, "is not a readable GGUF file"),
    ],
)
def test_a_corrupt_gguf_is_one_line(tmp_path, monkeypatch, content, expected):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(LayerpruneError, match=expected):
        lp.load(str(bad), device="cpu", quiet=True)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_a_gguf_without_weights_is_one_line(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "vocab-only.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LayerpruneError, match="without model weights"):
        lp.load(str(path), device="cpu", quiet=True)


def test_an_architecture_transformers_cannot_read_from_gguf_is_one_line(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LayerpruneError, match="transformers cannot load the 'rwkv6' GGUF") as e:
        lp.load(str(path), device="cpu", quiet=True)
    assert "\n" not in str(e.value)
