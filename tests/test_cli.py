"""The command line on the paths a user runs: results files, plans, checkpoints.

Bad input is swept in test_reliability.py. Most runs here go through `layerprune.cli.main` in this
process (the `cli` fixture); one runs the installed console entry point as a user would.
"""

import json
import subprocess
import sys

import pytest


def test_console_entry_point_info_json():
    r = subprocess.run(
        [sys.executable, "-m", "layerprune.cli", "info", "fixture", "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["blocks"] == 12 and info["architecture"] == "llama"
    assert len(info["parameters_per_block"]) == 12
    # tied embeddings (8192 x 256) and the final norm (256) are the only parameters outside blocks
    assert info["parameters"] == sum(info["parameters_per_block"]) + 8192 * 256 + 256
    assert [sum(p) for p in info["parameters_per_part"]] == info[
        "parameters_per_block"
    ]  # norms go with their part


def test_eval_writes_results(tmp_path, cli):
    out = tmp_path / "r.json"
    r = cli(
        "eval",
        "fixture",
        "--ppl",
        "fixture:test",
        "--seqlen",
        "64",
        "--max-windows",
        "4",
        "-o",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    result = doc["perplexity"][0]
    assert result["protocol"]["windows"] == 4 and result["tokens"] == 4 * 63
    assert result["ppl"] > 1 and doc["versions"]["transformers"].startswith("5.")
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


@pytest.fixture(scope="module")
def bi_scores(tmp_path_factory):
    import layerprune as lp

    path = tmp_path_factory.mktemp("scores") / "bi.json"
    lm = lp.load("fixture", device="cpu", quiet=True)
    lp.score(lm, "bi", lp.calibration(lm, samples=4, seqlen=32), progress=False).save(path)
    return path


def test_score_plan_apply_pipeline(tmp_path, cli, bi_scores):
    r = cli(
        "score",
        "fixture",
        "--method",
        "bi",
        "--samples",
        "4",
        "--seqlen",
        "32",
        "-o",
        tmp_path / "bi.json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "bi.json").read_text())
    assert scores["importance"] == json.loads(bi_scores.read_text())["importance"]  # CLI == Python API
    assert scores["method"] == "bi" and scores["feeds"] == "depth" and (tmp_path / "bi.png").exists()
    plan_path = tmp_path / "plan.json"
    r = cli("plan", "fixture", "--scores", tmp_path / "bi.json", "--remove", "3", "-o", plan_path, "--quiet")
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_path.read_text())
    order = sorted(range(12), key=lambda i: scores["importance"][i])
    assert plan["format"] == "layerprune.plan/2" and plan["kind"] == "depth"
    assert plan["remove"] == [str(i) for i in sorted(order[:3])]
    r = cli("apply", plan_path, "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 9
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["blocks_after"] == 9 and report["plan"]["remove"] == plan["remove"]
    assert "fixture" in (tmp_path / "out" / "README.md").read_text()


def test_shapley_score_with_store_and_recheck(tmp_path, cli):
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
    r = cli(*args, "--store", tmp_path / "s.sqlite", "-o", tmp_path / "s.json", *common)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["extra"]["evaluations"] == 25 and doc["extra"]["surrogate"]["heldout"] == 5
    r = cli(*args, "--store", tmp_path / "s.sqlite", "-o", tmp_path / "s2.json", *common)
    assert json.loads((tmp_path / "s2.json").read_text())["extra"]["evaluations_this_run"] == 0  # all stored
    r = cli(
        "plan",
        "fixture",
        "--scores",
        tmp_path / "s.json",
        "--remove",
        "2",
        "--recheck",
        "3",
        "-o",
        tmp_path / "p.json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    assert len(plan["extra"]["recheck"]) == 3 and len(plan["remove"]) == 2
    best = min(plan["extra"]["recheck"], key=lambda c: c["calibration_ppl"])
    assert plan["remove"] == best["removed"]


def test_sparsity_plan_from_a_scores_file_and_apply(tmp_path, cli):
    """`plan --scores alpha.json` uses the file (a hand-edited metric moves the allocation), and
    apply prunes to the plan's per-layer targets."""
    r = cli("score", "fixture", "--method", "alpha", "-o", tmp_path / "alpha.json", "--quiet", "--no-plot")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "alpha.json").read_text())
    assert doc["feeds"] == "sparsity" and len(doc["units"]) == 84
    values = [1.0] * 84
    values[7 * 5 : 7 * 6] = [3.0] * 7  # block 5: the lightest tail -> pruned most
    doc["extra"]["metric_values"] = values
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    plan_path = tmp_path / "plan.json"
    common = ["--samples", "8", "--seqlen", "64", "--quiet"]
    r = cli(
        "plan",
        "fixture",
        "--sparsity",
        "0.5",
        "--allocation",
        "alpha",
        "--pruner",
        "wanda",
        "--scores",
        tmp_path / "edited.json",
        "-o",
        plan_path,
        *common,
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(plan_path.read_text())
    # AlphaPruning's map, by hand: blocks at the metric's min get 1 - eps, the max 1 + eps (eps 0.2),
    # all scaled so that the parameter-weighted mean is the target; every block has the same size.
    scale = 0.5 * 12 / (11 * 0.8 + 1.2)
    assert plan["layers"]["5.q"] == pytest.approx(1.2 * scale) and plan["layers"]["0.down"] == pytest.approx(
        0.8 * scale
    )
    assert plan["params"]["epsilon"] == 0.2 and plan_path.with_suffix(".png").exists()
    r = cli("apply", plan_path, "-o", tmp_path / "out", "--offload", "disk", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert abs(report["pruning"]["achieved_mean_sparsity"] - 0.5) < 0.01
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "model.safetensors")
    for name, key in (
        ("5.down", "model.layers.5.mlp.down_proj.weight"),
        ("0.q", "model.layers.0.self_attn.q_proj.weight"),
    ):
        assert abs(float((weights[key] == 0).float().mean()) - plan["layers"][name]) < 0.01


def test_iterative_depth_plan_through_the_cli(tmp_path, cli):
    r = cli(
        "score",
        "fixture",
        "--method",
        "ppl",
        "--samples",
        "4",
        "--seqlen",
        "32",
        "-o",
        tmp_path / "ppl.json",
        "--quiet",
        "--no-plot",
    )
    assert r.returncode == 0, r.stderr
    r = cli(
        "plan",
        "fixture",
        "--scores",
        tmp_path / "ppl.json",
        "--remove",
        "2",
        "--iterative",
        "-o",
        tmp_path / "p.json",
        "--quiet",
        "--no-plot",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["params"]["iterative"] is True and len(plan["extra"]["iterations"]) == 2
    assert plan["remove"] == sorted({h["removed"] for h in plan["extra"]["iterations"]}, key=int)


def test_width_search_plan_apply_and_reload(tmp_path, cli):
    """score wanda-sp -> plan --width --allocation search (a small search with a store and a log) ->
    apply: a physically smaller checkpoint that layerprune reloads with the same perplexity."""
    small = ["--samples", "8", "--seqlen", "64", "--quiet", "--no-plot"]
    r = cli("score", "fixture", "--method", "wanda-sp", "-o", tmp_path / "wsp.json", *small)
    assert r.returncode == 0, r.stderr
    args = ["plan", "fixture", "--width", "0.3", "--scores", tmp_path / "wsp.json", "--allocation", "search",
            "--population", "4", "--crossovers", "2", "--mutations", "2", "--iterations", "1",
            "--store", tmp_path / "fit.sqlite", "--log", tmp_path / "search.jsonl"]  # fmt: skip
    r = cli(*args, "-o", tmp_path / "plan.json", *small)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["kind"] == "width" and plan["params"]["achieved"] == pytest.approx(0.3, abs=0.01)
    lines = [json.loads(x) for x in (tmp_path / "search.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "end" and (tmp_path / "search.png").exists()
    r = cli(*args, "-o", tmp_path / "again.json", *small)  # every candidate is in the store now
    assert json.loads((tmp_path / "again.json").read_text())["extra"]["evaluations_this_run"] == 0
    r = cli("apply", tmp_path / "plan.json", "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["pruning"]["parameters_after"] < report["pruning"]["parameters_before"]
    r = cli(
        "eval", tmp_path / "out", "--ppl", "fixture:val", "--seqlen", "128", "--max-windows", "8", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    # the same plan applied in this process: the reloaded checkpoint computes the same function
    import layerprune as lp

    lm = lp.load("fixture", device="cpu", quiet=True)
    lp.apply(lm, lp.Plan.load(tmp_path / "plan.json"), progress=False)
    want = lp.perplexity(lm, "fixture:val", seqlen=128, max_windows=8, progress=False).ppl
    assert f"perplexity {want:.4f}" in r.stdout, (want, r.stdout)


@pytest.mark.parametrize("env", ["layerprune", "xdg", "home"])
def test_info_env_names_the_cache_every_stage_uses(env, cli, tmp_path, monkeypatch):
    """$LAYERPRUNE_CACHE, else $XDG_CACHE_HOME/layerprune, else ~/.cache/layerprune; the GGUF
    conversions, llama.cpp's build and the importance matrices all live under it."""
    from layerprune.io import writable_cache
    from layerprune.models.llamacpp import cache_root as llamacpp_root
    from layerprune.models.llamacpp_quant import imatrix_cache

    monkeypatch.delenv("LAYERPRUNE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if env == "layerprune":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "lp"))
        want = tmp_path / "lp"
    elif env == "xdg":
        monkeypatch.setenv("LAYERPRUNE_CACHE", "")  # empty: unset
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        want = tmp_path / "xdg" / "layerprune"
    else:
        want = tmp_path / "home" / ".cache" / "layerprune"
    r = cli("info", "--env", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cache"] == str(want)
    assert (writable_cache("gguf"), llamacpp_root(), imatrix_cache()) == (
        want / "gguf",
        want / "llama.cpp",
        want / "imatrix",
    )
