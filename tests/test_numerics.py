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
            "--batch-size", "2", "--warmup", "0", "--eval-windows", "2", "-o", tmp_path / "rec", "--no-plot",
            *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "rec" / "config.json").read_text())["dtype"] == "bfloat16"
    r = cli("report", tmp_path / "m", tmp_path / "e.json", tmp_path / "rec", "-o", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report" / "report.md").read_text()
    assert "dtype @ device" in md and md.count("bfloat16 @ cpu") == 2


# --- `--dtype auto` on a CPU: bf16 for the stages that gain from it, where the CPU has it (item 9) ---


@pytest.mark.parametrize(
    ("stage", "native", "pinned", "expected"),
    [
        ("score:ppl", True, "", torch.bfloat16),
        ("score:bi", True, "", torch.bfloat16),
        ("score:angular", True, "", torch.bfloat16),
        ("score:ppl", False, "", torch.float32),  # emulated bf16 is many times slower
        ("score:taylor", True, "", torch.float32),  # slower in bf16 (bench/precision.py)
        ("score:shapley", True, "", torch.float32),
        (None, True, "", torch.float32),  # eval, apply, recover, the Python API without a stage
        ("score:ppl", True, "float32", torch.float32),  # $LAYERPRUNE_CPU_DTYPE pins it
        (None, False, "bf16", torch.bfloat16),
        ("score:ppl", True, "auto", torch.bfloat16),
    ],
)
def test_auto_on_a_cpu_chooses_bf16_by_stage_and_hardware(monkeypatch, stage, native, pinned, expected):
    from layerprune.models import loading

    monkeypatch.setattr(loading, "cpu_native_bf16", lambda: native)
    monkeypatch.setenv("LAYERPRUNE_CPU_DTYPE", pinned)
    assert loading.default_dtype("cpu", None, stage) == expected


def test_auto_on_a_gpu_is_the_checkpoints_dtype_whatever_the_cpu_pin(monkeypatch):
    from types import SimpleNamespace

    from layerprune.models import loading

    monkeypatch.setenv("LAYERPRUNE_CPU_DTYPE", "float32")
    cfg = SimpleNamespace(dtype="bfloat16")
    assert loading.default_dtype("cuda", cfg, "score:ppl") == torch.bfloat16
    assert loading.default_dtype("cuda", SimpleNamespace(dtype=None), None) == torch.float32


def test_a_bad_cpu_pin_is_one_line_naming_the_variable(monkeypatch):
    from layerprune.models import loading

    monkeypatch.setenv("LAYERPRUNE_CPU_DTYPE", "float8")
    with pytest.raises(LayerpruneError, match=r"\$LAYERPRUNE_CPU_DTYPE: unknown dtype 'float8'"):
        loading.default_dtype("cpu", None, "score:ppl")


@pytest.fixture(scope="module")
def fp32_stored(tmp_path_factory, fixture_lm):
    """The bundled model (stored in bf16) with every weight nudged off the bf16 grid, stored in float32,
    as most fine-tuned checkpoints are: its bf16 load holds rounded weights."""
    folder = tmp_path_factory.mktemp("fp32_stored")
    lm = lp.load("fixture", device="cpu", quiet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=g))
    lm.model.config.dtype = torch.float32
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    assert _stored_dtypes(folder) == {"F32"}
    return folder


def test_a_model_loaded_in_bf16_is_the_same_model_as_its_float32_load(fp32_stored):
    """A checkpoint stored in float32 loads in bf16 with rounded weights and hashes differently; a record
    made on the bf16 load is still recognised by the float32 load (its weights rounded to bf16 reproduce
    the bf16 load's hash), never the other way round, and never after pruning."""
    f32 = lp.load(str(fp32_stored), device="cpu", dtype="float32", quiet=True)
    bf = lp.load(str(fp32_stored), device="cpu", dtype="bfloat16", quiet=True)
    assert bf.fingerprint != f32.fingerprint  # stored in float32: the loads differ
    record = {"fingerprint": bf.fingerprint, **bf.numerics}
    assert f32.same_model(record)
    assert f32.same_model({"fingerprint": f32.fingerprint, **f32.numerics})
    # a float32 record cannot be checked on a bf16 load: refused
    assert not bf.same_model({"fingerprint": f32.fingerprint, **f32.numerics})
    # another model's record, even in bf16, is not this one
    assert not f32.same_model({**record, "fingerprint": "0" * 16})
    # a pruned copy (one weight zeroed) does not match the unpruned bf16 record
    pruned = lp.load(str(fp32_stored), device="cpu", quiet=True)
    with torch.no_grad():
        pruned.adapter.blocks[0].mlp.down_proj.weight[0, :] = 0
    pruned.modified()
    assert not pruned.same_model(record)


def test_scores_made_in_bf16_plan_and_apply_in_float32(tmp_path, cli, monkeypatch, fp32_stored):
    """What `--dtype auto` does on a CPU with native bf16: scoring in bf16, planning and applying in
    float32, of a checkpoint stored in float32. The plan is accepted by the float32 apply, and removes
    the blocks the bf16 scores chose."""
    model = str(fp32_stored)
    monkeypatch.setenv("LAYERPRUNE_CPU_DTYPE", "bfloat16")  # what auto gives scoring on such a CPU
    r = cli("score", model, "--method", "bi", "--calib", "fixture:val", "--samples", "2", "--seqlen", "64",
            "-o", tmp_path / "s.json", "--no-plot", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["model"]["dtype"] == "bfloat16"
    monkeypatch.setenv("LAYERPRUNE_CPU_DTYPE", "float32")
    r = cli("plan", model, "--scores", tmp_path / "s.json", "--remove", "2", "-o", tmp_path / "p.json",
            "--no-plot", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("apply", tmp_path / "p.json", "-o", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr
    imp = scores["importance"]
    lowest = sorted(sorted(range(len(imp)), key=lambda i: imp[i])[:2])
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["numerics"]["dtype"] == "float32"
    assert sorted(int(u) for u in report["plan"]["remove"]) == lowest
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == len(imp) - 2
    # the other way round, a float32 plan applied in bf16 cannot be checked: one line saying so
    r = cli("score", model, "--method", "bi", "--calib", "fixture:val", "--samples", "2", "--seqlen", "64",
            "-o", tmp_path / "s32.json", "--no-plot", "--quiet")  # fmt: skip
    r = cli("plan", model, "--scores", tmp_path / "s32.json", "--remove", "2", "-o", tmp_path / "p32.json",
            "--no-plot", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli("apply", tmp_path / "p32.json", "-o", tmp_path / "m16", "--dtype", "bfloat16", "--quiet")
    assert r.returncode == 2
    assert "float32" in r.stderr and "--dtype float32" in r.stderr and len(r.stderr.strip().splitlines()) == 1
