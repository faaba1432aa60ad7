"""Width plans end to end: Wanda-sp scores against a brute-force computation, rates to masks, a
store-backed search that resumes, and apply == the masked model."""

import sqlite3

import pytest
import torch

import layerprune as lp
from layerprune.data import Windows
from layerprune.models.tiny import tiny_model
from layerprune.models.width import masked
from layerprune.models.width_decisions import budgets, counts, masks_for
from layerprune.planners.width import make_plan


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    model = tiny_model("llama").eval()
    return lp.LoadedModel("tiny-llama", model, None, lp.ModelAdapter(model), None)


def windows(n=6, seqlen=16, seed=0):
    ids = torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, {"dataset": "random", "samples": n, "seqlen": seqlen, "seed": seed, "bos": "none",
                         "fingerprint": f"random-{n}-{seqlen}-{seed}"})  # fmt: skip


def test_wanda_sp_equals_brute_force_from_captured_activations():
    """Per KV group: sum of |W| * ||X|| over the rows of q (its 2 query heads), k and v (its KV head)
    and over the columns of o that read its query heads; per channel: row c of gate and up, column
    c of down. Inputs captured by hooks in one plain forward of the dense model."""
    lm = tiny_lm()
    w = windows()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, block in enumerate(lm.model.model.layers):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{i}.{name.split('.')[-1]}"
                hooks.append(
                    mod.register_forward_pre_hook(
                        lambda m, a, key=key: inputs.setdefault(key, []).append(
                            a[0].reshape(-1, a[0].shape[-1])
                        )
                    )
                )
    with torch.no_grad():
        lm.model(w.input_ids)
    for h in hooks:
        h.remove()
    norms = {k: torch.cat(v).double().norm(dim=0) for k, v in inputs.items()}
    scores = lp.score(lm, "wanda-sp", w, progress=False, batch_size=4)
    d, heads_per_group = 8, 2  # hidden 32 / 4 heads; 4 heads over 2 KV heads
    for i, block in enumerate(lm.model.model.layers):
        a, m = block.self_attn, block.mlp

        def s(layer, proj, rows=None, cols=None, i=i):
            W = layer.weight.detach().double().abs() * norms[f"{i}.{proj}"][None, :]
            return float(W[rows].sum() if rows is not None else W[:, cols].sum())

        for g in range(2):
            q_rows = list(range(g * heads_per_group * d, (g + 1) * heads_per_group * d))
            kv_rows = list(range(g * d, (g + 1) * d))
            want = s(a.q_proj, "q_proj", rows=q_rows) + s(a.k_proj, "k_proj", rows=kv_rows)
            want += s(a.v_proj, "v_proj", rows=kv_rows) + s(a.o_proj, "o_proj", cols=q_rows)
            assert scores.extra["groups"][i][g] == pytest.approx(want, rel=1e-5)
        for c in (0, 17, 63):
            want = (
                s(m.gate_proj, "gate_proj", rows=[c])
                + s(m.up_proj, "up_proj", rows=[c])
                + s(m.down_proj, "down_proj", cols=[c])
            )
            assert scores.extra["channels"][i][c] == pytest.approx(want, rel=1e-5)
    assert scores.feeds == "width" and scores.units[:2] == ["0.attn", "0.mlp"]


def test_rates_meet_each_block_budget_and_never_remove_every_group():
    lm = tiny_lm()
    blocks = budgets(lm.adapter)
    b = blocks[0]  # 2 groups of 8*32*4 + ... ; 64 channels of 3*32
    assert (b.groups, b.channels) == (2, 64)
    assert b.group_params == 2 * 8 * 32 + 8 * 32 + 8 * 32 + 2 * 8 * 32 and b.channel_params == 3 * 32
    for r in (0.0, 0.1, 0.3, 0.6, 0.89):
        (g, c) = counts([r] * 4, blocks)[0]
        assert g < b.groups and c < b.channels
        assert (
            abs(g * b.group_params + c * b.channel_params - r * b.params) <= b.channel_params / 2 + 1e-9
            or c == b.channels - 1
        )


def test_search_with_a_store_resumes_with_only_the_missing_evaluations(tmp_path):
    lm, w = tiny_lm(), windows()
    scores = lp.score(lm, "wanda-sp", w, progress=False)
    kwargs = dict(scores=scores, fitness_windows=w, population=6, crossovers=3, mutations=3, iterations=3,
                  seed=1, progress=False)  # fmt: skip
    full = make_plan(
        lm, 0.3, "search", w, store=tmp_path / "a.sqlite", log=str(tmp_path / "log.jsonl"), **kwargs
    )
    total = full.extra["evaluations_this_run"]
    assert total >= 10 and (tmp_path / "log.png").exists()
    # a run killed after k evaluations = a store holding its first k rows
    k = total // 2
    src = sqlite3.connect(tmp_path / "a.sqlite")
    dst = sqlite3.connect(tmp_path / "b.sqlite")
    dst.executescript("".join(line for line in src.iterdump() if not line.startswith('INSERT INTO "evals"')))
    rows = src.execute("SELECT * FROM evals ORDER BY created LIMIT ?", (k,)).fetchall()
    dst.executemany("INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    dst.commit()
    dst.close()
    resumed = make_plan(lm, 0.3, "search", w, store=tmp_path / "b.sqlite", **kwargs)
    assert resumed.extra["evaluations_this_run"] == total - k
    assert (
        resumed.params["rates"] == full.params["rates"]
        and resumed.attn == full.attn
        and resumed.mlp == full.mlp
    )
    again = make_plan(lm, 0.3, "search", w, store=tmp_path / "a.sqlite", **kwargs)
    assert again.extra["evaluations_this_run"] == 0


def test_apply_equals_the_masked_model_and_the_plan_mean_is_the_target(tmp_path):
    lm, w = tiny_lm(), windows()
    scores = lp.score(lm, "wanda-sp", w, progress=False)
    plan = lp.plan(lm, scores, width=0.3, allocation="uniform")
    assert plan.params["achieved"] == pytest.approx(0.3, abs=0.02)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    decision = list(zip(plan.params["removed"]["groups"], plan.params["removed"]["channels"]))
    table = scores.extra
    with torch.no_grad(), masked(lm.adapter, masks_for(decision, table)):
        want = lm.model(ids).logits
    plan.save(tmp_path / "plan.json")
    report = lp.apply(lm, lp.Plan.load(tmp_path / "plan.json"), w)
    with torch.no_grad():
        got = lm.model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (
        report["parameters_after"]
        == sum(p.numel() for p in lm.model.parameters())
        < report["parameters_before"]
    )


def test_width_plan_errors():
    lm, w = tiny_lm(), windows()
    scores = lp.score(lm, "wanda-sp", w, progress=False)
    with pytest.raises(lp.LayerpruneError, match=r"must be in \(0, 1\)"):
        lp.plan(lm, scores, width=1.2)
    with pytest.raises(lp.LayerpruneError, match="p-min"):
        lp.plan(lm, scores, width=0.2, allocation="search", p_min=0.5, p_max=0.3)
    with pytest.raises(lp.LayerpruneError, match="p-max"):
        lp.plan(lm, scores, width=0.8, allocation="search", p_max=0.5)
    with pytest.raises(lp.LayerpruneError, match="add --allocation search"):
        lp.plan(lm, scores, width=0.2, p_max=0.5)
    plan = lp.plan(lm, scores, width=0.2)
    plan.attn[1] = 0.9  # round(0.9 * 2) = 2 of 2 KV groups
    with pytest.raises(lp.LayerpruneError, match="removes all 2 KV groups of block 1"):
        lp.apply(lm, plan, w)
    other = tiny_lm()
    with torch.no_grad():
        other.model.model.layers[0].mlp.up_proj.weight.mul_(2)
    with pytest.raises(lp.LayerpruneError, match="pass the model it was made for"):
        lp.apply(other, lp.plan(lm, scores, width=0.2), w)
    with pytest.raises(lp.LayerpruneError, match="feed width plans"):
        lp.plan(lm, scores, remove=1)


def test_width_search_with_calib_runs_offline_on_a_non_fixture_model(tmp_path, cli):
    """`plan MODEL --width --allocation search --calib my.txt` on a model that is not the fixture
    calibrates its fitness on my.txt (10 x 128 unless given), never on a default online corpus, and
    the plan records the fitness windows: equal to an independent draw from the same text."""
    import json

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from layerprune.data import calibration_windows, load_text
    from layerprune.models.loading import FIXTURE_DIR
    from layerprune.models.tiny import tiny_config

    folder = tmp_path / "tiny"
    config = tiny_config("llama")
    config.vocab_size, config.max_position_embeddings = (
        8192,
        256,
    )  # the fixture's tokenizer, 128-token windows
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(FIXTURE_DIR)
    tok.save_pretrained(folder)
    text = tmp_path / "my.txt"
    text.write_text((FIXTURE_DIR / "data" / "val.txt").read_text()[:60_000])
    out = tmp_path / "w.json"
    r = cli("plan", folder, "--width", "0.2", "--allocation", "search", "--calib", text, "--samples", "4",
            "--seqlen", "32", "--population", "4", "--iterations", "1", "--crossovers", "1", "--mutations", "1",
            "--fitness-samples", "3", "--fitness-seqlen", "24", "--quiet", "--no-plot", "-o", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    fit = json.loads(out.read_text())["extra"]["fitness_calibration"]
    assert (fit["dataset"], fit["samples"], fit["seqlen"]) == (str(text), 3, 24)
    expected = calibration_windows(tok, load_text(str(text)), 3, 24, seed=0, bos=fit["bos"])
    assert fit["fingerprint"] == expected.fingerprint
    # defaults: the depth papers' 10 x 128
    r = cli("plan", folder, "--width", "0.2", "--allocation", "search", "--calib", text, "--samples", "4",
            "--seqlen", "32", "--population", "4", "--iterations", "1", "--crossovers", "1", "--mutations", "1",
            "--quiet", "--no-plot", "-o", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    fit = json.loads(out.read_text())["extra"]["fitness_calibration"]
    assert (fit["dataset"], fit["samples"], fit["seqlen"]) == (str(text), 10, 128)
    r = cli("plan", folder, "--width", "0.2", "--calib", text, "--fitness-samples", "3", "-o", out)
    assert r.returncode == 2 and "add --allocation search" in r.stderr
