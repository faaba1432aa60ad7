"""GGUF export through llama.cpp's own converter. Runs where the converter is installed
($LAYERPRUNE_LLAMA_CPP, or the cache that `python bench/serve.py --setup` fills); the refusals run
everywhere. llama.cpp itself runs in bench/serve.py."""

from __future__ import annotations

import json

import pytest
import torch
from test_decilm import tiny

from layerprune.checkpoint import export
from layerprune.errors import LayerpruneError
from layerprune.models import llamacpp
from layerprune.models.adapter import ModelAdapter
from layerprune.models.decilm import to_decilm
from layerprune.models.llamacpp import check_convertible, find_converter, install_converter, to_gguf
from layerprune.models.loading import LoadedModel, resolve
from layerprune.models.shrink import shrink
from layerprune.models.width import WidthMask

pytestmark = pytest.mark.usefixtures("one_thread")


def converter():
    try:
        return find_converter()
    except LayerpruneError:
        return None


needs_converter = pytest.mark.skipif(converter() is None, reason="llama.cpp's converter is not installed")


@pytest.fixture(scope="module")
def smol_tokenizer():
    """A tokenizer llama.cpp's converter knows (its pre-tokenizer hash): SmolLM2's, installed by setup."""
    from transformers import AutoTokenizer

    try:
        _, folder = resolve("smollm2", quiet=True)
    except LayerpruneError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(folder)


def tensors(path):
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    field = r.fields["general.architecture"]
    return (
        bytes(field.parts[field.data[0]]).decode(),
        {t.name: tuple(int(n) for n in t.shape) for t in r.tensors},
        r,
    )


@needs_converter
def test_deciLM_model_converts_to_a_deci_gguf_with_its_block_shapes(tmp_path, smol_tokenizer):
    model = tiny("llama", vocab=len(smol_tokenizer))
    adapter = ModelAdapter(model)
    shrink(adapter, [WidthMask(None, list(range(512)))] + [WidthMask(None, None)] * 4)
    to_decilm(adapter, {1: {"attn"}, 3: {"attn", "mlp"}})
    export(LoadedModel("tiny", model, smol_tokenizer, adapter, None), tmp_path / "m", None)
    out = to_gguf(tmp_path / "m", tmp_path / "m.gguf")
    arch, names, reader = tensors(out)
    assert arch == "deci"
    assert names["blk.0.ffn_down.weight"] == (512, 64)  # GGUF lists ne: (in, out)
    assert names["blk.2.ffn_down.weight"] == (768, 64)
    assert not any(n.startswith(("blk.1.attn_q", "blk.1.attn_norm")) for n in names)
    assert (
        sum(n.startswith("blk.") and n.endswith("attn_q.weight") for n in names) == 3
    )  # 4 blocks, 1 without
    heads = reader.fields["deci.attention.head_count"]
    assert [int(heads.parts[i][0]) for i in heads.data] == [4, 0, 4, 4]  # query heads: all or none
    assert not list(tmp_path.glob(".*.tmp"))


@needs_converter
def test_uniform_width_model_converts_as_llama(tmp_path, smol_tokenizer):
    model = tiny("llama", vocab=len(smol_tokenizer))
    adapter = ModelAdapter(model)
    shrink(adapter, [WidthMask([1], list(range(100, 612)))] * 5)  # one KV group of two, 512 channels
    export(LoadedModel("tiny", model, smol_tokenizer, adapter, None), tmp_path / "m", None)
    arch, names, _ = tensors(to_gguf(tmp_path / "m", tmp_path / "m.gguf", outtype="f16"))
    assert arch == "llama"
    assert names["blk.4.ffn_up.weight"] == (64, 512) and names["blk.0.attn_q.weight"] == (64, 32)


def test_what_no_engine_serves_is_refused_before_converting(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "layerprune_block_configs": [{}]}))
    with pytest.raises(LayerpruneError, match="re-make the plan with --deploy decilm"):
        check_convertible(folder)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "layerprune_removed_parts": ["2.attn"]})
    )
    with pytest.raises(LayerpruneError, match="zeroed attention / MLP parts"):
        check_convertible(folder)
    blocks = [
        {"attention": {"no_op": False, "n_heads_in_group": 2}, "ffn": {"no_op": True, "ffn_mult": None}}
    ]
    (folder / "config.json").write_text(json.dumps({"model_type": "nemotron-nas", "block_configs": blocks}))
    with pytest.raises(LayerpruneError, match="block 0 keeps its attention without an MLP"):
        check_convertible(folder)
    with pytest.raises(LayerpruneError, match="inside"):
        to_gguf(folder, folder / "x.gguf", converter=tmp_path)
    with pytest.raises(LayerpruneError, match=r"\*\.gguf"):
        to_gguf(folder, tmp_path / "x.bin")


def test_a_missing_converter_names_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    monkeypatch.delenv("LAYERPRUNE_LLAMA_CPP", raising=False)
    monkeypatch.setattr(llamacpp, "env_converter", lambda: tmp_path / "not-installed")
    with pytest.raises(LayerpruneError, match="bench/serve.py --setup"):
        find_converter()
    with pytest.raises(LayerpruneError, match="no convert_hf_to_gguf.py there"):
        find_converter(tmp_path)


def test_the_converter_alone_is_unpacked_from_a_source_distribution(tmp_path, monkeypatch):
    """install_converter takes the script and the two folders it imports, and nothing else."""
    import io
    import tarfile

    files = {
        "pkg-1/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('converter')",
        "pkg-1/vendor/llama.cpp/conversion/__init__.py": b"",
        "pkg-1/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
        "pkg-1/vendor/llama.cpp/ggml/src/ggml.c": b"int x;",
        "pkg-1/vendor/llama.cpp/convert_lora_to_gguf.py": b"",
        "pkg-1/setup.py": b"",
    }
    sdist = tmp_path / "pkg-1.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    dest = install_converter(sdist, tmp_path / "env" / "llama.cpp")
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not list((tmp_path / "env").glob(".*.tmp"))
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERPRUNE_LLAMA_CPP", raising=False)
    monkeypatch.setattr(llamacpp, "env_converter", lambda: dest)
    assert find_converter() == dest
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as t:
        info = tarfile.TarInfo("x-1/setup.py")
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(LayerpruneError, match="llama-cpp-python source distribution"):
        install_converter(bad, tmp_path / "env2")


def test_removed_modules_weigh_nothing():
    """A DeciLM model holds exactly the kept weights: the parameter count by hand."""
    model = tiny("llama")
    adapter = ModelAdapter(model)
    shrink(adapter, [WidthMask(None, list(range(256)))] + [WidthMask(None, None)] * 4)
    to_decilm(adapter, {2: {"attn"}})
    h, v, kv = 64, 128, 32
    attn = h * h * 2 + h * kv * 2 + h  # q, o; k, v; input norm
    mlp = lambda width: 3 * h * width + h  # noqa: E731  gate, up, down; post-attention norm
    expected = 2 * v * h + h + 5 * attn - attn + mlp(256) + 4 * mlp(768)
    assert sum(p.numel() for p in model.parameters()) == expected
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
