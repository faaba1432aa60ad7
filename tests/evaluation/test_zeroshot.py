"""Zero-shot accuracy through lm-eval: the same numbers as a direct computation, above chance on the
bundled tasks, and every misuse a one-line error (offline: conftest sets HF_*_OFFLINE)."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.evaluation import zeroshot as zs  # noqa: E402
from layerprune.models.loading import FIXTURE_DIR  # noqa: E402

LOCAL = ("fixture_kjv", "fixture_pydoc", "fixture_wordnet")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: two spin-waiting threads crawl when another process holds one of the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _examples(name: str, n: int | None = None) -> list[dict]:
    lines = zs.local_tasks()[name].read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


@pytest.fixture
def spy(monkeypatch):
    """zeroshot()'s result, with lm-eval's raw output (per-sample log-likelihoods) kept aside."""
    raw = {}
    real = zs.run_lm_eval

    def run(*args, **kwargs):
        raw["out"] = real(*args, **kwargs)
        return raw["out"]

    monkeypatch.setattr(zs, "run_lm_eval", run)
    return raw


# ---- the shipped task files -------------------------------------------------------------------------
def test_bundled_tasks_are_well_formed_held_out_text():
    assert tuple(zs.local_tasks()) == LOCAL
    held_out = (FIXTURE_DIR / "data" / "test.txt").read_text(encoding="utf-8")
    for name in LOCAL:
        examples = _examples(name)
        assert 200 <= len(examples) <= 500
        for e in examples:
            assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
            assert 0 <= e["label"] < 4
            assert e["context"].endswith((" ", "\n"))  # the configs' target delimiter is ""
            assert e["context"] + e["choices"][e["label"]] in held_out
        labels = [e["label"] for e in examples]
        assert min(labels.count(k) for k in range(4)) > len(examples) / 8  # answers not all in one slot


# ---- lm-eval computes what we would compute by hand ---------------------------------------------------
@torch.no_grad()
def _loglikelihood(lm, context: str, continuation: str) -> float:
    """As lm-eval's HFLM: trailing spaces of the context move to the continuation; the pair is
    tokenised whole (with the tokenizer's BOS) and split at the length of the tokenised context."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = lm.tokenizer(context + continuation)["input_ids"]
    ctx = lm.tokenizer(context)["input_ids"]
    assert whole[: len(ctx)] == ctx and len(whole) <= 256
    ids = torch.tensor([whole])
    logprobs = lm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    targets = ids[0, len(ctx) :]
    return float(logprobs[len(ctx) - 1 : -1].gather(-1, targets[:, None]).sum())


def test_accuracy_equals_a_direct_computation(fixture_lm, spy):
    n = 20
    result = zs.zeroshot(fixture_lm, "fixture_kjv", limit=n, batch_size=8, progress=False)
    task = result["tasks"]["fixture_kjv"]
    samples = sorted(spy["out"]["samples"]["fixture_kjv"], key=lambda s: s["doc_id"])
    assert task["samples"] == len(samples) == n

    acc, acc_norm = [], []
    for e, s in zip(_examples("fixture_kjv", n), samples):
        assert s["doc"]["context"] == e["context"]
        lls = [_loglikelihood(fixture_lm, e["context"], c) for c in e["choices"]]
        harness = [float(r[0][0]) for r in s["resps"]]  # (loglikelihood, is_greedy) per choice
        assert harness == pytest.approx(lls, abs=1e-3)
        pred = max(range(4), key=lambda i: lls[i])
        pred_norm = max(range(4), key=lambda i: lls[i] / len(e["choices"][i]))  # per character
        acc.append(float(pred == e["label"]))
        acc_norm.append(float(pred_norm == e["label"]))
        assert (s["acc"], s["acc_norm"]) == (acc[-1], acc_norm[-1])

    assert task["acc"] == pytest.approx(sum(acc) / n, abs=1e-12)
    assert task["acc_norm"] == pytest.approx(sum(acc_norm) / n, abs=1e-12)
    p = task["acc"]
    assert task["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # sample stderr of a mean
    assert task["num_choices"] == 4 and task["chance"] == 0.25 and task["metric"] == "acc"
    assert task["num_fewshot"] == 0 and task["version"] == zs.LOCAL_VERSION
    assert result["mean"] == task["acc"] and result["limit"] == n and result["lm_eval_version"]


def test_dense_fixture_is_above_chance(fixture_lm):
    n = 60  # (on all 500: kjv 0.436, wordnet 0.416, pydoc 0.328, each +- 0.022)
    result = zs.zeroshot(fixture_lm, "fixture", limit=n, progress=False)
    tasks = result["tasks"]
    assert tuple(tasks) == LOCAL
    for name, t in tasks.items():
        assert t["samples"] == n and t["chance"] == 0.25 and t["acc"] > t["chance"], (name, t["acc"])
    for name in ("fixture_kjv", "fixture_wordnet"):  # the two strong tasks, each 2 standard errors up
        assert tasks[name]["acc"] > 0.25 + 2 * tasks[name]["acc_stderr"], (name, tasks[name]["acc"])
    # pooled over the 3 x 60 examples, chance is more than 3.5 standard errors (of a guesser) away
    pooled = sum(t["acc"] for t in tasks.values()) / 3
    assert pooled > 0.25 + 3.5 * math.sqrt(0.25 * 0.75 / (3 * n)), pooled
    assert result["mean"] == pytest.approx(pooled)


# ---- names, aliases and errors ---------------------------------------------------------------------
def test_aliases_expand_in_order_without_duplicates():
    assert zs.resolve_tasks("fixture") == list(LOCAL)
    assert zs.resolve_tasks(" fixture_wordnet, fixture ,fixture_wordnet") == [
        "fixture_wordnet",
        "fixture_kjv",
        "fixture_pydoc",
    ]
    assert zs.resolve_tasks(["fixture_kjv"]) == ["fixture_kjv"]
    assert zs._names("commonsense") == list(zs.COMMONSENSE)
    with pytest.raises(LayerpruneError, match="no task given"):
        zs.resolve_tasks(" , ")


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        ("piqa", "task 'piqa' needs a network and none is reachable; the local tasks are: fixture_kjv"),
        ("commonsense", "task 'boolq' needs a network"),
        ("fixture_kjv,no_such_task", "task 'no_such_task' is not a local task.*local tasks are: fixture_kjv"),
    ],
)
def test_offline_standard_or_unknown_task_fails_fast(fixture_lm, monkeypatch, tasks, match):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_harness(*args, **kwargs):
        raise AssertionError("lm-eval must not run")

    monkeypatch.setattr(zs, "run_lm_eval", no_harness)
    with pytest.raises(LayerpruneError, match=match):
        zs.zeroshot(fixture_lm, tasks, progress=False)


@pytest.mark.parametrize("tasks", ["piqa", "nonsense"])
def test_cli_bad_task_is_one_line_before_loading(cli, monkeypatch, tasks):
    import layerprune.cli.common

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(layerprune.cli.common, "_load", no_load)
    r = cli("eval", "fixture", "--tasks", tasks)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerprune: error:")
    assert f"'{tasks}'" in lines[0] and "fixture_kjv, fixture_pydoc, fixture_wordnet" in lines[0]


def test_cli_nothing_to_evaluate_names_both_options(cli):
    r = cli("eval", "fixture")
    assert r.returncode == 2
    assert r.stderr.startswith("layerprune: error: nothing to evaluate") and "--ppl" in r.stderr
    assert "--tasks" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_eval_tasks_writes_results(cli, tmp_path, fixture_lm):
    out = tmp_path / "out.json"
    r = cli("eval", "fixture", "--tasks", "fixture_kjv", "--limit", 20, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert any(
        line.startswith("fixture_kjv: acc ") and "chance 0.2500" in line for line in r.stdout.splitlines()
    )
    doc = json.loads(out.read_text())
    assert doc["model"] == "fixture" and doc["model_path"] == str(FIXTURE_DIR)
    assert doc["model_fingerprint"] == fixture_lm.fingerprint
    assert doc["parameters"] == sum(p.numel() for p in fixture_lm.model.parameters())
    assert doc["perplexity"] == [] and doc["versions"]["layerprune"] and doc["created"]
    task = doc["zeroshot"]["tasks"]["fixture_kjv"]
    assert task["samples"] == 20 and task["chance"] == 1 / task["num_choices"] == 0.25
    assert 0 <= task["acc"] <= 1 and task["acc_stderr"] > 0 and "acc_norm" in task
    assert doc["zeroshot"]["limit"] == 20 and doc["zeroshot"]["mean"] == task["acc"]
