"""Depth plans and their application: selection rules, exports that reload anywhere, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from layerprune.checkpoint import export
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import LoadedModel, load, model_fingerprint
from layerprune.models.tiny import tiny_model
from layerprune.planners.depth import make_plan, protected_blocks
from layerprune.plans import DepthPlan, Plan
from layerprune.pruners.depth import apply, split_units
from layerprune.scorers.base import Scores


def scores(importance, method="ppl", unit="block", num_blocks=None, extra=None):
    units = (
        [str(i) for i in range(len(importance))]
        if unit == "block"
        else [f"{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}" for i in range(len(importance))]
    )
    L = num_blocks or (len(importance) if unit == "block" else len(importance) // 2)
    return Scores(
        method,
        unit,
        units,
        importance,
        {"name": "m", "fingerprint": "f", "num_blocks": L},
        {},
        None,
        0.0,
        extra or {},
    )


def test_one_shot_takes_the_lowest_unprotected():
    s = scores([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 9.0, 0.1])
    assert make_plan(s, remove=3).remove == ["1", "3", "7"]
    plus = make_plan(s, remove=2, protect="plus")  # protects 0,1,2,3,6,7
    assert plus.remove == ["4", "5"] and plus.params["protected"] == [0, 1, 2, 3, 6, 7]
    assert make_plan(scores([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 9.0, 0.1], method="taylor"), remove=2).remove == [
        "4",
        "5",
    ]
    assert make_plan(s, ratio=0.25).remove == ["3", "7"]
    assert protected_blocks("0,-1", 8, "ppl") == [0, 7]


def test_iterative_rescores_after_each_removal():
    s = scores([3.0, 1.0, 2.0, 4.0])
    calls = []

    def rescore(removed):
        calls.append(list(removed))
        return [None if r else v for r, v in zip(removed, [3.0, 9.0, 9.0, 0.5])]

    plan = make_plan(s, remove=2, iterative=True, rescore=rescore)
    assert plan.remove == ["1", "3"] and calls == [[False, True, False, False]]
    assert plan.extra["iterations"][1] == {"removed": "3", "importance": 0.5}


def test_angular_cuts_the_best_contiguous_span():
    spans = {"1": [0.3, 0.2, 0.1, 0.4], "2": [0.5, 0.15, 0.2], "3": [0.6, 0.4]}
    s = scores(spans["1"], method="angular", extra={"spans": spans})
    assert make_plan(s, remove=2).remove == ["1", "2"]
    assert make_plan(s, remove=2, protect="1").remove == ["2", "3"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"remove": 8}, "keep at least one"),
        ({"remove": 3, "protect": "plus"}, "only 2 units are not protected"),
        ({"remove": 2, "protect": "0,9"}, "block 9 does not exist"),
        ({}, "--remove N or --ratio R"),
        ({"ratio": 1.5}, "between 0 and 1"),
        ({"remove": 2, "iterative": True}, "needs the model to re-score"),
    ],
)
def test_plan_errors(kwargs, message):
    with pytest.raises(LayerpruneError, match=message):
        make_plan(scores([float(i) for i in range(8)]), **kwargs)


def test_split_units():
    from layerprune.models.adapter import Unit

    blocks, parts = split_units([Unit(1), Unit(3, "attn"), Unit(3, "mlp"), Unit(4, "mlp"), Unit(0, "attn")])
    assert blocks == [1, 3] and [str(u) for u in parts] == ["0.attn", "4.mlp"]


def _lm(arch, tmp_path, num_layers=5):
    """A tiny model saved and loaded through layerprune.load, as a user would."""
    from transformers import PreTrainedTokenizerFast

    from layerprune.models.loading import FIXTURE_DIR

    model = tiny_model(arch, num_layers=num_layers)
    path = tmp_path / f"{arch}-base"
    model.save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(FIXTURE_DIR).save_pretrained(path)
    return load(str(path), device="cpu", quiet=True)


def _depth_plan(lm, remove, unit="block"):
    return DepthPlan(
        model={
            "name": lm.name,
            "fingerprint": lm.fingerprint,
            "architecture": lm.adapter.spec.name,
            "num_blocks": lm.adapter.num_blocks,
        },
        method="ppl",
        params={},
        remove=remove,
        unit=unit,
    )


def test_module_plan_exports_a_checkpoint_plain_transformers_computes_right(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _lm("qwen2", tmp_path)
    x = torch.randint(3, 128, (2, 16))
    mask = [1] * 10
    for j in (2, 5, 6, 7):  # 1.attn, 2.mlp, and the whole of block 3
        mask[j] = 0
    with torch.no_grad(), lm.adapter.skip(mask, "module"):
        expected = lm.model(input_ids=x, use_cache=False).logits
    plan = _depth_plan(lm, ["1.attn", "2.mlp", "3.attn", "3.mlp"], unit="module")
    counts = apply(lm, plan)
    assert counts["removed_blocks"] == [3] and counts["silenced_parts"] == ["1.attn", "2.mlp"]
    export(lm, tmp_path / "out", plan, {"pruning": counts})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.num_hidden_layers == 4
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)
    ours = load(str(tmp_path / "out"), device="cpu", quiet=True)
    assert type(ours.adapter.part(1, "attn")).__name__ == "ZeroBranch"  # no compute for removed parts
    with torch.no_grad():
        torch.testing.assert_close(ours.model(input_ids=x).logits, expected, rtol=1e-4, atol=1e-4)


def test_fingerprint_mismatch_and_bad_plans(tmp_path):
    lm = _lm("llama", tmp_path)
    plan = _depth_plan(lm, ["1"])
    plan.model["fingerprint"] = "0123456789abcdef"
    with pytest.raises(LayerpruneError, match="pass the model it was made for with --model"):
        apply(lm, plan)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_depth_plan(lm, ["0", "1", "2", "3", "4"]).to_dict()}))
    with pytest.raises(LayerpruneError, match="removes all 5 blocks"):
        Plan.load(bad)
    bad.write_text("{")
    with pytest.raises(LayerpruneError, match="cannot read plan"):
        Plan.load(bad)
    bad.write_text(json.dumps({**_depth_plan(lm, ["7"]).to_dict()}))
    with pytest.raises(LayerpruneError, match="do not exist in a model of 5 blocks"):
        Plan.load(bad)


def test_export_is_atomic_and_refuses_the_input_folder(tmp_path):
    lm = _lm("llama", tmp_path)
    plan = _depth_plan(lm, ["2"])
    apply(lm, plan)
    with pytest.raises(LayerpruneError, match="inside the input model folder"):
        export(lm, lm.path / "pruned", plan, {})
    export(lm, tmp_path / "out", plan, {})
    with pytest.raises(LayerpruneError, match="already exists"):
        export(lm, tmp_path / "out", plan, {})
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_removed_blocks_checkpoint_generates_the_same_tokens_in_a_fresh_process(tmp_path, fixture_lm):
    lm = LoadedModel("fixture", fixture_lm.model, fixture_lm.tokenizer, fixture_lm.adapter, fixture_lm.path)
    import copy

    lm.model = copy.deepcopy(fixture_lm.model)  # the session fixture stays intact
    lm.adapter = ModelAdapter(lm.model)
    lm.source_dtype = torch.bfloat16
    plan = _depth_plan(lm, ["4", "7", "9"])
    apply(lm, plan)
    # The checkpoint is bf16 (the source dtype): compare with the in-memory model rounded alike.
    with torch.no_grad():
        for p in lm.model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    prompt = lm.tokenizer("In the beginning", return_tensors="pt").input_ids
    with torch.no_grad():
        in_memory = lm.model.generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
    export(lm, tmp_path / "pruned", plan, {})
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('In the beginning', return_tensors='pt').input_ids\n"
        "print(json.dumps(m.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pruned")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == in_memory
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["num_hidden_layers"] == 9
    assert model_fingerprint(lm.model) != fixture_lm.fingerprint


def test_recheck_evaluates_candidate_sets_and_keeps_the_best():
    s = scores([1.0, 2.0, 3.0, 4.0, 9.0, 9.0])
    seen = []

    def evaluate(sets):
        seen.extend(sets)
        return [10.0 - (1 in c) - 2 * (2 in c) for c in sets]  # {1, 2} is really the best pair

    plan = make_plan(s, remove=2, recheck=6, evaluate=evaluate)
    assert sorted(map(tuple, seen)) == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (1, 3),
        (2, 3),
    ]  # pairs of the 4 lowest
    assert plan.remove == ["1", "2"] and plan.extra["recheck"][0]["removed"] == ["0", "1"]
    assert make_plan(s, remove=2, recheck=1, evaluate=evaluate).remove == ["0", "1"]
    with pytest.raises(LayerpruneError, match="--recheck needs the model"):
        make_plan(s, remove=2, recheck=3)
