"""The top-level API as a user calls it (`import layerprune as lp` and nothing else), typed plans,
iterative planning against a brute-force greedy search, and the demo."""

import json
import math

import pytest
import torch

import layerprune as lp


def plain_nll(model, ids: torch.Tensor) -> float:
    """Token-mean NLL of next-token prediction by the model's own forward (no layerprune code)."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    )


def test_the_readme_example(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = lp.load("fixture", device="cpu", quiet=True)
    calib = lp.calibration(lm, "fixture:val", samples=4, seqlen=64)
    scores = lp.score(lm, "ppl", calib, progress=False)
    plan = lp.plan(lm, scores, remove=3)
    assert isinstance(plan, lp.DepthPlan) and isinstance(scores, lp.Scores)
    lowest = sorted(range(12), key=lambda i: scores.importance[i])[:3]
    assert plan.remove == [str(i) for i in sorted(lowest)]
    # the ppl score of block i is the calibration perplexity without block i: check one by hand
    i = lowest[0]
    keep = [j for j in range(12) if j != i]
    with lm.adapter.skip([int(j in keep) for j in range(12)]):
        assert scores.importance[i] == pytest.approx(math.exp(plain_nll(lm.model, calib.input_ids)), rel=1e-4)
    counts = lp.apply(lm, plan)
    assert counts["blocks_after"] == 9
    out = lp.export(lm, tmp_path / "pruned", plan)
    result = lp.perplexity(lm, "fixture:test", seqlen=128, max_windows=6, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = lp.eval_windows(lm.tokenizer, lp.load_text("fixture:test"), 128, "first", 6)
    assert result.ppl == pytest.approx(
        math.exp(plain_nll(reloaded, windows.input_ids)), rel=1e-3
    )  # bf16 export
    assert lp.Plan.load(out / "plan.json").remove == plan.remove


def test_verbs_are_functions_and_listed():
    import layerprune.plans  # noqa: F401 - importing the submodules must not shadow the verbs
    import layerprune.scorers  # noqa: F401

    for verb in ("load", "calibration", "score", "plan", "apply", "export", "perplexity"):
        assert callable(getattr(lp, verb)) and not isinstance(getattr(lp, verb), type(lp)), verb
        assert verb in dir(lp)
    assert {"Plan", "DepthPlan", "SparsityPlan", "WidthPlan", "Scores", "LayerpruneError"} <= set(dir(lp))


def test_sparsity_plan_uses_the_scores_it_is_given(fixture_lm):
    alpha = lp.score(fixture_lm, "alpha", progress=False)
    assert alpha.feeds == "sparsity" and alpha.unit == "layer"
    plan = lp.plan(fixture_lm, sparsity=0.6, allocation="alpha", pruner="magnitude", scores=alpha)
    assert plan.scores == alpha.extra["metric_values"] and plan.params["epsilon"] == 0.3
    numel = {n: fixture_lm.adapter.layer(n).weight.numel() for n in plan.layers}
    mean = sum(plan.layers[n] * numel[n] for n in numel) / sum(numel.values())
    assert mean == pytest.approx(0.6, abs=1e-9)  # AlphaPruning keeps the parameter-weighted mean
    with pytest.raises(lp.LayerpruneError, match="feed sparsity plans"):
        lp.plan(fixture_lm, alpha, remove=2)


def test_iterative_plan_equals_a_brute_force_greedy_search(fixture_lm):
    """--iterative with the ppl criterion: remove the block whose removal (given those already
    removed) gives the lowest calibration perplexity, re-scoring after each removal. Brute force:
    every candidate evaluated by the model's own forward with the blocks skipped."""
    calib = lp.calibration(fixture_lm, samples=4, seqlen=32)
    scores = lp.score(fixture_lm, "ppl", calib, progress=False)
    plan = lp.plan(fixture_lm, scores, remove=3, iterative=True, progress=False)
    removed: list[int] = []
    for _ in range(3):
        losses = {}
        for j in range(12):
            if j not in removed:
                with fixture_lm.adapter.skip([0 if k in removed or k == j else 1 for k in range(12)]):
                    losses[j] = plain_nll(fixture_lm.model, calib.input_ids)
        removed.append(min(losses, key=losses.get))
    assert [h["removed"] for h in plan.extra["iterations"]] == [str(j) for j in removed]
    assert plan.remove == [str(j) for j in sorted(removed)]


def test_plans_are_validated_on_save_and_version_1_is_read(tmp_path, fixture_lm):
    plan = lp.plan(fixture_lm, sparsity=0.5, pruner="magnitude")
    plan.layers["3.q"] = 1.5
    with pytest.raises(lp.LayerpruneError, match=r"layer 3.q has sparsity 1.5"):
        plan.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    plan.layers["3.q"] = 0.5
    v1 = {k: v for k, v in plan.to_dict().items() if k not in ("pruner", "layers", "nm")}
    v1.update(
        format="layerprune.plan/1",
        remove=[],
        unit="block",
        sparsity={"pruner": "magnitude", "nm": None, "layers": plan.layers},
    )
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    old = lp.Plan.load(tmp_path / "v1.json")
    assert isinstance(old, lp.SparsityPlan) and old.layers == plan.layers and old.pruner == "magnitude"
    old.check(fixture_lm)


def test_demo_writes_what_it_reports(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerprune.demo import demo

    results = demo(
        tmp_path / "demo",
        model="fixture",
        remove=2,
        eval_windows=8,
        zeroshot_limit=10,
        sparsity_samples=8,
        recover_steps=2,
        quiet=True,
    )
    scores = lp.Scores.load(tmp_path / "demo" / "scores.json")
    lowest = sorted(range(12), key=lambda i: scores.importance[i])[:2]
    assert results["plan"] == [str(i) for i in sorted(lowest)]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "model", dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 10
    tok = lp.load("fixture", device="cpu", quiet=True).tokenizer
    windows = lp.eval_windows(tok, lp.load_text("fixture:test"), 128, "first", 8)
    assert results["pruned"]["ppl"] == pytest.approx(math.exp(plain_nll(model, windows.input_ids)), rel=1e-3)
    assert results["dense"]["ppl"] < results["pruned"]["ppl"]
    assert (
        json.loads((tmp_path / "demo" / "results.json").read_text())["pruned"]["ppl"]
        == results["pruned"]["ppl"]
    )
    # the report puts the dense model, both pruned models and the recovered one side by side
    page = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    rows = {r["label"]: r for r in page["rows"]}
    assert set(rows) == {"fixture", "model", "wanda50", "model+lora"}, set(rows)
    assert rows["model"]["parameters"] == rows["model+lora"]["parameters"] == model.num_parameters()
    assert rows["wanda50"]["parameters"] == rows["fixture"]["parameters"]  # zeros are stored densely
    assert rows["model+lora"]["recovery"]["steps"] == 2
    for file in ("dense", "model", "model+lora"):
        evaluation = json.loads((tmp_path / "demo" / "evals" / f"{file}.json").read_text())
        assert (
            f"{evaluation['perplexity'][0]['ppl']:.3f}"
            in (tmp_path / "demo" / "report" / "report.md").read_text()
        )
        assert evaluation["zeroshot"]["tasks"] and evaluation["zeroshot"]["limit"] == 10
