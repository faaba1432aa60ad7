"""Issue 31: `--dtype` on every command, provenance of dtype and device, exports that state the dtype
of their tensors, and caches / stores that never serve a result computed in another precision."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import layerprune as lp
from layerprune.errors import LayerpruneError
from layerprune.models.loading import parse_dtype

pytestmark = pytest.mark.usefixtures("one_thread")


def _stored_dtypes(folder) -> set[str]:
    """The dtypes the folder's safetensors hold, read from the files themselves."""
    kinds = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            kinds |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return kinds


ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def test_parse_dtype_names_and_refusal():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("FP32") is torch.float32
    assert parse_dtype("auto") == "auto" and parse_dtype(None) == "auto"
    with pytest.raises(LayerpruneError, match="use auto, float32"):
        parse_dtype("int8")
    with pytest.raises(LayerpruneError, match="not supported"):
        parse_dtype(torch.float64)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("session", ["float32", "bfloat16", "float16"])
def test_export_config_states_the_dtype_of_its_tensors(tmp_path, stored, session):
    """The tensors go out in the checkpoint's dtype, and config.json must say that dtype, whatever
    the session computed in (save_pretrained wrote the in-memory one); a reload with 'auto' on a GPU
    then computes in it."""
    src = tmp_path / "src"
    lm = lp.load("fixture", dtype=stored, quiet=True)
    lm.model.save_pretrained(src)
    lm.tokenizer.save_pretrained(src)
    lm = lp.load(str(src), dtype=session, quiet=True)
    assert lm.numerics == {"dtype": session, "device": "cpu"}
    out = lp.export(lm, tmp_path / "out", None)
    config = json.loads((out / "config.json").read_text())
    assert _stored_dtypes(out) == {ST[stored]}
    assert config["dtype"] == stored and "torch_dtype" not in config
    report = json.loads((out / "report.json").read_text())
    assert report["numerics"] == {"dtype": session, "device": "cpu", "stored": stored}
    from layerprune.models.llamacpp import stored_outtype

    assert stored_outtype(out) == {"float32": "f32", "bfloat16": "bf16"}[stored]


def test_a_store_of_one_precision_is_never_reused_in_another(tmp_path):
    """ppl scores into a store in bf16; fp32 with the same store is refused in one line, and the
    fp32 values (computed afresh, no store) differ from the bf16 ones, so a reuse would have been wrong."""
    store = tmp_path / "evals.sqlite"
    bf16 = lp.load("fixture", dtype="bfloat16", quiet=True)
    calib = lp.calibration(bf16, "fixture:val", samples=2, seqlen=64)
    s_bf16 = lp.score(bf16, "ppl", calib, store=str(store), progress=False)
    assert s_bf16.model["dtype"] == "bfloat16" and s_bf16.model["device"] == "cpu"
    fp32 = lp.load("fixture", dtype="float32", quiet=True)
    calib32 = lp.calibration(fp32, "fixture:val", samples=2, seqlen=64)
    assert calib32.fingerprint == calib.fingerprint
    with pytest.raises(LayerpruneError, match="computed in bfloat16 on cpu, not in float32 on cpu"):
        lp.score(fp32, "ppl", calib32, store=str(store), progress=False)
    s_fp32 = lp.score(fp32, "ppl", calib32, progress=False)
    assert s_fp32.model["dtype"] == "float32"
    assert max(abs(a - b) for a, b in zip(s_bf16.importance, s_fp32.importance)) > 1e-6
    # the same precision resumes from its store: every value equal, bit for bit
    again = lp.score(bf16, "ppl", calib, store=str(store), progress=False)
    assert again.importance == s_bf16.importance


def test_a_store_from_before_numerics_were_recorded_is_float32_on_cpu(tmp_path):
    import sqlite3

    from layerprune.engine.store import EvalStore

    path = tmp_path / "old.sqlite"
    with EvalStore(path, "m", "d") as s:
        s.put("b:1", 1.0, 1)
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM meta WHERE key='numerics'")  # as a store of an older version
    db.close()
    with EvalStore(path, "m", "d", numerics="float32@cpu") as s:
        assert s.get("b:1") == (1.0, 1)
    with pytest.raises(LayerpruneError, match="float32 on cpu, not in bfloat16 on cuda"):
        EvalStore(path, "m", "d", numerics="bfloat16@cuda")


def test_a_level_database_of_one_precision_is_refused_in_another(tmp_path):
    from layerprune.engine.levels import LevelDatabase
    from layerprune.pruners.levels import build_levels

    bf16 = lp.load("fixture", dtype="bfloat16", quiet=True)
    names = bf16.adapter.layer_names()[:2]
    db = build_levels(bf16, "magnitude", {n: [0.5] for n in names}, None, tmp_path / "db", progress=False)
    assert db.manifest["model"]["numerics"] == "bfloat16@cpu"
    db.check(bf16, "magnitude")
    fp32 = lp.load("fixture", dtype="float32", quiet=True)
    with pytest.raises(LayerpruneError, match="computed in bfloat16 on cpu, not in float32 on cpu"):
        LevelDatabase(tmp_path / "db").check(fp32, "magnitude")


def test_the_alpha_cache_never_serves_another_precision(tmp_path, monkeypatch):
    """alpha spectra are cached per model. The fixture is stored in bf16, so its bf16 and fp32 loads
    share a fingerprint: a cache file written by a bf16 run (here made recognisable by poisoning it)
    must not be read by an fp32 run, whose values equal an fp32 computation with an empty cache."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    bf16 = lp.load("fixture", dtype="bfloat16", quiet=True)
    fp32 = lp.load("fixture", dtype="float32", quiet=True)
    assert fp32.fingerprint == bf16.fingerprint
    lp.score(bf16, "alpha", progress=False)
    (written,) = (tmp_path / "cache" / "esd").glob("*.json")
    table = json.loads(written.read_text())
    written.write_text(json.dumps({n: {k: 7.0 for k in m} for n, m in table.items()}))
    assert set(lp.score(bf16, "alpha", progress=False).importance) == {-7.0}  # bf16 reads its cache
    a_fp32 = lp.score(fp32, "alpha", progress=False)
    assert len(list((tmp_path / "cache" / "esd").glob("*.json"))) == 2
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "fresh"))
    assert a_fp32.importance == lp.score(fp32, "alpha", progress=False).importance
    assert -7.0 not in a_fp32.importance


def test_the_cli_runs_every_stage_in_bfloat16(tmp_path, cli):
    """One command per stage with --dtype bfloat16 on the CPU; each records what it computed in."""
    info = cli("info", "fixture", "--json", "--quiet", "--dtype", "bfloat16")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["dtype"] == "bfloat16"
    common = ("--dtype", "bfloat16", "--quiet")
    r = cli("score", "fixture", "--method", "bi", "--samples", "2", "--seqlen", "64",
            "-o", tmp_path / "s.json", "--no-plot", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["model"]["dtype"] == "bfloat16"
    r = cli("plan", "fixture", "--scores", tmp_path / "s.json", "--remove", "2", "-o", tmp_path / "p.json",
            "--no-plot", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("plan", "fixture", "--sparsity", "0.5", "--pruner", "wanda", "--samples", "2", "--seqlen", "64",
            "-o", tmp_path / "w.json", "--no-plot", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("apply", tmp_path / "w.json", "-o", tmp_path / "wanda", *common)
    assert r.returncode == 0, r.stderr
    r = cli("apply", tmp_path / "p.json", "-o", tmp_path / "m", *common)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "report.json").read_text())["numerics"]["dtype"] == "bfloat16"
    r = cli("eval", tmp_path / "m", "--ppl", "fixture:test", "--max-windows", "2", "-o", tmp_path / "e.json",
            *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["numerics"] == {"dtype": "bfloat16", "device": "cpu"}
    r = cli("recover", tmp_path / "m", "--data", "fixture:train", "--steps", "2", "--seqlen", "64",
            "--batch-size", "2", "--warmup", "0", "-o", tmp_path / "rec", "--no-plot", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rec" / "config.json").read_text())["dtype"] == "bfloat16"
    r = cli("report", tmp_path / "m", tmp_path / "e.json", tmp_path / "rec", "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "dtype @ device" in md and md.count("bfloat16 @ cpu") == 2
