"""The command line: results files, and bad input as one line naming the fix (exit 2, no traceback)."""

import json
import subprocess
import sys

import pytest

from layerprune.models.loading import FIXTURE_DIR


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "layerprune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_info_json():
    r = run("info", "fixture", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["blocks"] == 12 and info["architecture"] == "llama"
    assert len(info["parameters_per_block"]) == 12
    assert (
        info["parameters"] == sum(info["parameters_per_block"]) + 8192 * 256 + 256
    )  # tied embeddings, final norm


def test_eval_writes_results(tmp_path):
    out = tmp_path / "r.json"
    r = run(
        "eval",
        "fixture",
        "--ppl",
        "fixture:test",
        "--seqlen",
        "64",
        "--max-windows",
        "4",
        "-o",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    result = doc["perplexity"][0]
    assert result["protocol"]["windows"] == 4 and result["tokens"] == 4 * 63
    assert result["ppl"] > 1 and doc["versions"]["transformers"].startswith("5.")
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "/no/such/model"], "does not exist"),
        (["eval", "fixture", "--ppl", "fixture:test", "--seqlen", "4096"], "exceeds the model's context"),
        (["eval", "fixture", "--ppl", "wikitext2"], "needs a network"),
        (["eval", "fixture", "--ppl", "fixture:test", "--mask", "101"], "12 block units"),
        (["eval", "fixture", "--ppl", "fixture:test", "--mask", "0" * 12], "removes every block"),
        (["eval", "fixture", "--ppl", "fixture:test", "--mask", "1x1"], "string of 0/1"),
        (["eval", "fixture"], "pass --ppl"),
    ],
)
def test_bad_input_is_one_line(args, message):
    r = run(*args, "--quiet")
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("layerprune: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_output_inside_model_folder_is_refused(tmp_path):
    target = FIXTURE_DIR / "results.json"
    r = run("eval", "fixture", "--ppl", "fixture:test", "-o", str(target), "--quiet")
    assert r.returncode == 2 and "inside the input model folder" in r.stderr
    assert not target.exists()


def test_short_text_and_not_a_model(tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    r = run("eval", "fixture", "--ppl", str(tmp_path / "short.txt"), "--seqlen", "128", "--quiet")
    assert r.returncode == 2 and "fewer than one window" in r.stderr
    r = run("info", str(tmp_path), "--quiet")
    assert r.returncode == 2 and "no config.json" in r.stderr


@pytest.fixture(scope="module")
def fixture_scores(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    r = run(
        "score",
        "fixture",
        "--method",
        "bi",
        "--samples",
        "4",
        "--seqlen",
        "32",
        "-o",
        str(d / "bi.json"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    return d / "bi.json"


def test_score_plan_apply_pipeline(tmp_path, fixture_scores):
    scores = json.loads(fixture_scores.read_text())
    assert scores["method"] == "bi" and len(scores["importance"]) == 12
    assert fixture_scores.with_suffix(".png").exists()
    plan_path = tmp_path / "plan.json"
    r = run(
        "plan", "fixture", "--scores", str(fixture_scores), "--remove", "3", "-o", str(plan_path), "--quiet"
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_path.read_text())
    order = sorted(range(12), key=lambda i: scores["importance"][i])
    assert plan["remove"] == [str(i) for i in sorted(order[:3])]
    r = run("apply", str(plan_path), "-o", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 9
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["blocks_after"] == 9 and report["plan"]["remove"] == plan["remove"]
    assert "fixture" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--remove", "12"], "keep at least one"),
        (["--remove", "7", "--protect", "plus"], "only 6 units are not protected"),
    ],
)
def test_bad_plans(tmp_path, fixture_scores, extra, message):
    r = run(
        "plan", "fixture", "--scores", str(fixture_scores), *extra, "-o", str(tmp_path / "p.json"), "--quiet"
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_scores_of_the_wrong_length_and_unknown_method(tmp_path, fixture_scores):
    doc = json.loads(fixture_scores.read_text())
    doc["units"], doc["importance"] = doc["units"][:5], doc["importance"][:5]
    doc["model"]["num_blocks"] = 5
    (tmp_path / "short.json").write_text(json.dumps(doc))
    r = run(
        "plan",
        "fixture",
        "--scores",
        str(tmp_path / "short.json"),
        "--remove",
        "1",
        "-o",
        str(tmp_path / "p.json"),
    )
    assert r.returncode == 2 and "scores 5 block units but fixture has 12" in r.stderr
    r = run("score", "fixture", "--method", "magic", "-o", str(tmp_path / "s.json"))
    assert r.returncode == 2 and "unknown scoring method 'magic'" in r.stderr


def test_plan_for_another_model(tmp_path, fixture_scores):
    plan_path = tmp_path / "plan.json"
    run("plan", "fixture", "--scores", str(fixture_scores), "--remove", "2", "-o", str(plan_path), "--quiet")
    other = tmp_path / "other"
    r = run("apply", str(plan_path), "-o", str(other), "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("apply", str(plan_path), "--model", str(other), "-o", str(tmp_path / "again"), "--quiet")
    assert r.returncode == 2 and "pass the model it was made for" in r.stderr
    assert not (tmp_path / "again").exists()


def test_shapley_score_with_store_and_recheck(tmp_path):
    common = ["--samples", "4", "--seqlen", "32", "--quiet"]
    args = [
        "score",
        "fixture",
        "--method",
        "shapley",
        "--budget",
        "24",
        "--strata",
        "11,10,9",
        "--epochs",
        "20",
    ]
    r = run(*args, "--store", str(tmp_path / "s.sqlite"), "-o", str(tmp_path / "s.json"), *common)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["extra"]["evaluations"] == 25 and doc["extra"]["surrogate"]["heldout"] == 5
    r = run(*args, "--store", str(tmp_path / "s.sqlite"), "-o", str(tmp_path / "s2.json"), *common)
    assert json.loads((tmp_path / "s2.json").read_text())["extra"]["evaluations_this_run"] == 0  # all stored
    r = run(
        "plan",
        "fixture",
        "--scores",
        str(tmp_path / "s.json"),
        "--remove",
        "2",
        "--recheck",
        "3",
        "-o",
        str(tmp_path / "p.json"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    assert len(plan["extra"]["recheck"]) == 3 and len(plan["remove"]) == 2
    r = run(
        "score", "fixture", "--method", "shapley", "--budget", "2", "-o", str(tmp_path / "x.json"), *common
    )
    assert r.returncode == 2 and "cannot cover 5 strata" in r.stderr
    r = run(
        "score", "fixture", "--method", "shapley", "--strata", "12,3", "-o", str(tmp_path / "x.json"), *common
    )
    assert r.returncode == 2 and "outside 1..11" in r.stderr


def test_sparsity_plan_apply_pipeline(tmp_path):
    plan_path = tmp_path / "plan.json"
    r = run(
        "plan",
        "fixture",
        "--sparsity",
        "0.5",
        "--allocation",
        "alpha",
        "--pruner",
        "wanda",
        "--samples",
        "8",
        "--seqlen",
        "64",
        "-o",
        str(plan_path),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_path.read_text())
    assert plan["kind"] == "sparsity" and len(plan["sparsity"]["layers"]) == 12 * 7
    assert plan["params"]["epsilon"] == 0.2 and plan_path.with_suffix(".png").exists()
    r = run("apply", str(plan_path), "-o", str(tmp_path / "out"), "--offload", "disk", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert abs(report["pruning"]["achieved_mean_sparsity"] - 0.5) < 0.01
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "model.safetensors")
    down = weights["model.layers.5.mlp.down_proj.weight"]
    assert abs(float((down == 0).float().mean()) - plan["sparsity"]["layers"]["5.down"]) < 0.01


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.2"], "must be in [0, 1)"),
        (["--sparsity", "0.5", "--nm", "4:4"], "N must be at least 1 and smaller than M"),
        (
            ["--sparsity", "0.8", "--allocation", "alpha", "--pruner", "magnitude", "--epsilon", "0.95"],
            "or less, or --clip",
        ),
        (["--sparsity", "0.5", "--allocation", "alpha", "--metric", "nope"], "unknown metric 'nope'"),
        (["--sparsity", "0.5", "--calib", "SHORT", "--samples", "128"], "Use more text, fewer --samples"),
    ],
)
def test_bad_sparsity_plans(tmp_path, extra, message):
    (tmp_path / "short.txt").write_text("In the beginning God created the heaven and the earth. " * 20)
    extra = [str(tmp_path / "short.txt") if e == "SHORT" else e for e in extra]
    r = run("plan", "fixture", *extra, "-o", str(tmp_path / "p.json"), "--quiet")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("layerprune: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "p.json").exists()
