"""FLAP (An et al., AAAI 2024): WIFV scores against statistics of inputs captured by plain hooks,
the bias compensation's closed form, the AL-AM global allocation against a brute-force ranking,
and exports that reload to the same logits."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import layerprune as lp
from layerprune.data import Windows
from layerprune.evaluation.perplexity import perplexity_of_windows
from layerprune.models.loading import FIXTURE_DIR, load
from layerprune.models.shrink import BLOCK_CONFIGS_KEY, shrink
from layerprune.models.tiny import VOCAB, tiny_model
from layerprune.models.width import WidthMask, masked
from layerprune.models.width_decisions import budgets, decision_of, masks_for
from layerprune.pruners.width import add_output_biases, compensation

D, HEADS_PER_GROUP = 8, 2  # tiny llama: hidden 32, 4 heads, 2 KV heads, MLP 64
GROUP_PARAMS, CHANNEL_PARAMS = 1536, 96  # by hand: see tests/pruners/test_width.py


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(arch="llama", seed=0):
    torch.manual_seed(seed)
    model = tiny_model(arch).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(FIXTURE_DIR)
    return lp.LoadedModel(f"tiny-{arch}", model, tok, lp.ModelAdapter(model), None)


def windows(n=6, seqlen=16, seed=0):
    ids = torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return Windows(ids, {"dataset": "random", "samples": n, "seqlen": seqlen, "seed": seed, "bos": "none",
                         "fingerprint": f"random-{n}-{seqlen}-{seed}"})  # fmt: skip


def captured_inputs(model, ids):
    """Inputs of every block's o_proj and down_proj in one plain forward: {(block, name): [tokens, f]}."""
    got, hooks = {}, []
    for i, block in enumerate(model.model.layers):
        for name, mod in (("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            hooks.append(
                mod.register_forward_pre_hook(
                    lambda _m, a, key=(i, name): got.setdefault(key, []).append(a[0].detach())
                )
            )
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v).double() for k, v in got.items()}  # [windows, tokens, f]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ---- (a) WIFV -------------------------------------------------------------------------------------
def test_wifv_equals_brute_force_from_hooked_inputs():
    """WIFV_j = var_j (torch.var, N - 1, over every calibration token) * ||W[:, j]||^2; a group
    scores the sum of WIFV^2 over its query heads' o features; means are token means. Micro-batches
    of 4 windows (so two merged batches) give the same statistics as one pass."""
    lm = tiny_lm()
    w = windows()
    x = captured_inputs(lm.model, w.input_ids)
    s = lp.score(lm, "flap", w, progress=False, batch_size=4)
    assert s.feeds == "width" and s.units[:2] == ["0.attn", "0.mlp"]
    for i, block in enumerate(lm.model.model.layers):
        wifv = {}
        for name, mod in (("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            tokens = x[(i, name)].reshape(-1, x[(i, name)].shape[-1])
            var = torch.var(tokens, dim=0, correction=1)
            wifv[name] = var * mod.weight.detach().double().pow(2).sum(0)
            part = "attn" if name == "o" else "mlp"
            assert s.extra["means"][part][i] == pytest.approx(tokens.mean(0).tolist(), rel=1e-6, abs=1e-9)
        assert s.extra["channels"][i] == pytest.approx(wifv["down"].tolist(), rel=1e-6)
        assert s.extra["attn_features"][i] == pytest.approx(wifv["o"].tolist(), rel=1e-6)
        for g in range(2):
            cols = slice(g * HEADS_PER_GROUP * D, (g + 1) * HEADS_PER_GROUP * D)
            assert s.extra["groups"][i][g] == pytest.approx(float(wifv["o"][cols].pow(2).sum()), rel=1e-6)
        assert s.importance[2 * i] == pytest.approx(sum(s.extra["groups"][i]))
    json.dumps(s.to_dict())  # the extra is plain JSON


def test_reference_fluctuation_closed_form():
    """`fluctuation="reference"`: FLAP's code's running estimate over N windows in order equals
    1/(N-1) * sum_{k=2..N} (k-1)/k * sum_t (x_kt - m_k)^2 with m_k the token mean of windows 1..k
    (the recurrence unrolled by hand)."""
    lm = tiny_lm()
    w = windows(n=5, seqlen=12)
    x = captured_inputs(lm.model, w.input_ids)
    s = lp.score(lm, "flap", w, progress=False, batch_size=2, fluctuation="reference")
    assert s.extra["fluctuation"] == "reference"
    for i, block in enumerate(lm.model.model.layers):
        xs = x[(i, "down")]  # [N, T, f]
        N = xs.shape[0]
        total = torch.zeros(xs.shape[-1], dtype=torch.float64)
        for k in range(2, N + 1):
            m_k = xs[:k].reshape(-1, xs.shape[-1]).mean(0)
            total += (k - 1) / k * (xs[k - 1] - m_k).pow(2).sum(0)
        want = total / (N - 1) * block.mlp.down_proj.weight.detach().double().pow(2).sum(0)
        assert s.extra["channels"][i] == pytest.approx(want.tolist(), rel=1e-6)


# ---- (b) bias compensation ------------------------------------------------------------------------
def some_masks(adapter):
    return [
        WidthMask([i % 2], sorted(set(range(64)) - set(range(i, 64, 3)))) for i in range(adapter.num_blocks)
    ]


def test_compensated_layer_equals_dense_layer_fed_the_means():
    """After compensation and shrinking, o_proj / down_proj on the kept features equal the dense
    layers on inputs whose removed features hold their calibration mean (brute-force means)."""
    lm = tiny_lm()
    w = windows()
    s = lp.score(lm, "flap", w, progress=False)
    x = captured_inputs(lm.model, w.input_ids)
    dense = copy.deepcopy(lm.model)
    masks = some_masks(lm.adapter)
    add_output_biases(lm.adapter, compensation(lm.adapter, masks, s.extra["means"]))
    shrink(lm, masks)
    assert lm.model.config.attention_bias and lm.model.config.mlp_bias
    for i, m in enumerate(masks):
        for name, keep in (
            ("o", [f for g in m.groups for f in range(g * 16, g * 16 + 16)]),
            ("down", m.channels),
        ):
            get = (lambda b: b.self_attn.o_proj) if name == "o" else (lambda b: b.mlp.down_proj)
            old, new = get(dense.model.layers[i]), get(lm.model.model.layers[i])
            n = old.in_features
            mean = x[(i, name)].reshape(-1, n).mean(0)
            inp = torch.randn(5, n, dtype=torch.float64)
            gone = sorted(set(range(n)) - set(keep))
            fed = inp.clone()
            fed[:, gone] = mean[gone]
            want = fed @ old.weight.double().T
            got = inp[:, keep] @ new.weight.double().T + new.bias.double()
            assert torch.allclose(got, want, atol=1e-5), (i, name)


def test_masked_with_means_equals_the_compensated_model():
    """The search's in-place evaluation (removed features read their mean) is the compensated model."""
    lm = tiny_lm()
    w = windows()
    s = lp.score(lm, "flap", w, progress=False)
    masks = some_masks(lm.adapter)
    probe = windows(n=2, seqlen=10, seed=7).input_ids
    with masked(lm.adapter, masks, s.extra["means"]):
        expected = logits(lm.model, probe)
    add_output_biases(lm.adapter, compensation(lm.adapter, masks, s.extra["means"]))
    shrink(lm, masks)
    assert torch.allclose(logits(lm.model, probe), expected, atol=1e-5)


def test_compensation_lowers_the_calibration_loss_of_the_trained_fixture(fixture_lm):
    lm = fixture_lm
    calib = lp.calibration(lm, "fixture:val", samples=8, seqlen=64)
    s = lp.score(lm, "flap", calib, progress=False)
    plan = lp.plan(lm, width=0.3, allocation="flap", scores=s, progress=False)
    masks = masks_for(decision_of(plan, budgets(lm.adapter)), s.extra)
    with masked(lm.adapter, masks):
        plain = perplexity_of_windows(lm.model, lm.adapter, calib, 8, progress=False).ppl
    with masked(lm.adapter, masks, s.extra["means"]):
        compensated = perplexity_of_windows(lm.model, lm.adapter, calib, 8, progress=False).ppl
    assert compensated < plain


# ---- (c) AL-AM allocation ----------------------------------------------------------------------------
def brute_force_al_am(extra, width, num_blocks, groups=2, channels=64):
    """FLAP's AL-AM written out: per block standardize WIFV^2 of the o features (torch.std, N - 1),
    a group = mean over its 16 features; standardize the channels' WIFV; rank every unit
    ascending; of every prefix of the ranking (each block keeping >= 1 group and channel) take the
    one whose removed parameters are closest to width * total."""
    units = []
    for i in range(num_blocks):
        a = torch.tensor(extra["attn_features"][i], dtype=torch.float64).pow(2)
        z = (a - a.mean()) / a.std()
        for g in range(groups):
            units.append((float(z[g * 16 : (g + 1) * 16].mean()), i, "g"))
        c = torch.tensor(extra["channels"][i], dtype=torch.float64)
        for v in ((c - c.mean()) / c.std()).tolist():
            units.append((v, i, "c"))
    units.sort()
    total = num_blocks * (groups * GROUP_PARAMS + channels * CHANNEL_PARAMS)
    best = None
    for k in range(len(units) + 1):
        cnt = [[0, 0] for _ in range(num_blocks)]
        for _, i, kind in units[:k]:
            cnt[i][kind == "c"] += 1
        dec = [(min(g, groups - 1), min(c, channels - 1)) for g, c in cnt]
        removed = sum(g * GROUP_PARAMS + c * CHANNEL_PARAMS for g, c in dec)
        dist = abs(removed - width * total)
        if best is None or dist < best[0] - 1e-9:
            best = (dist, dec)
    return best[1], total


@pytest.mark.parametrize("width", [0.1, 0.3, 0.5, 0.7])
def test_al_am_equals_a_brute_force_global_ranking(width):
    lm = tiny_lm()
    s = lp.score(lm, "flap", windows(), progress=False)
    plan = lp.plan(lm, width=width, allocation="flap", scores=s, progress=False)
    want, total = brute_force_al_am(s.extra, width, 4)
    got = list(zip(plan.params["removed"]["groups"], plan.params["removed"]["channels"]))
    assert got == want
    assert plan.pruner == "flap" and plan.method == "flap"
    assert abs(plan.params["achieved"] - width) * total <= GROUP_PARAMS / 2
    assert all(g < 2 and c < 64 for g, c in got)
    assert decision_of(plan, budgets(lm.adapter)) == got  # the plan's rates round-trip


def test_flap_allocation_errors_and_defaults():
    lm = tiny_lm()
    w = windows()
    wsp = lp.score(lm, "wanda-sp", w, progress=False)
    with pytest.raises(lp.LayerpruneError, match="ranks FLAP scores"):
        lp.plan(lm, width=0.3, allocation="flap", scores=wsp)
    with pytest.raises(lp.LayerpruneError, match="ranks FLAP scores"):
        lp.plan(lm, width=0.3, allocation="flap", pruner="wanda-sp", calib=w)
    plan = lp.plan(lm, width=0.3, allocation="flap", calib=w, progress=False)  # scores computed
    assert plan.pruner == "flap" and plan.calibration["fingerprint"] == w.fingerprint
    uniform = lp.plan(lm, width=0.3, allocation="uniform", scores=lp.score(lm, "flap", w, progress=False))
    assert uniform.pruner == "flap"


# ---- (d) apply, export, reload ----------------------------------------------------------------------------
def test_apply_reuses_the_plans_calibration_and_compensates():
    lm, w = tiny_lm(), windows()
    twin = tiny_lm()
    plan = lp.plan(lm, width=0.3, allocation="flap", scores=lp.score(lm, "flap", w, progress=False))
    counts = lp.apply(lm, plan, w, progress=False)
    assert counts["bias_compensation"] and counts["pruner"] == "flap"
    s = lp.score(twin, "flap", w, progress=False)
    masks = masks_for(decision_of(plan, budgets(twin.adapter)), s.extra)
    probe = windows(n=2, seqlen=10, seed=3).input_ids
    with masked(twin.adapter, masks, s.extra["means"]):
        assert torch.allclose(logits(lm.model, probe), logits(twin.model, probe), atol=1e-5)


def test_apply_without_calib_draws_the_recorded_windows():
    lm = lp.load("fixture", device="cpu", quiet=True)
    calib = lp.calibration(lm, "fixture:val", samples=4, seqlen=32)
    plan = lp.plan(lm, width=0.2, allocation="flap", calib=calib, progress=False)
    twin = copy.deepcopy(lm.model)
    lp.apply(lm, plan, progress=False)  # no calib: the plan's recorded fixture:val windows
    other = lp.LoadedModel("fixture", twin, lm.tokenizer, lp.ModelAdapter(twin), None)
    lp.apply(other, plan, calib, progress=False)
    probe = calib.input_ids[:1, :16]
    assert torch.equal(logits(lm.model, probe), logits(other.model, probe))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_reloads_to_the_same_logits(arch, tmp_path):
    """Per-block shapes: `layerprune.load` rebuilds them, biases included (Llama: the config's
    attention_bias / mlp_bias; qwen2: `output_bias` in the block shapes; gpt2: its own biases)."""
    lm, w = tiny_lm(arch), windows()
    plan = lp.plan(lm, width=0.5, allocation="flap", scores=lp.score(lm, "flap", w, progress=False))
    assert any(plan.params["removed"]["groups"])  # attention compensated too
    lp.apply(lm, plan, w, progress=False)
    probe = windows(n=2, seqlen=10, seed=5).input_ids
    expected = logits(lm.model, probe)
    lp.export(lm, tmp_path / "out", plan)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert BLOCK_CONFIGS_KEY in config
    if arch == "qwen2":
        assert all("output_bias" in b for b in config[BLOCK_CONFIGS_KEY])
    again = load(str(tmp_path / "out"), device="cpu", quiet=True)
    assert torch.equal(logits(again.model, probe), expected)


def test_uniform_flap_export_loads_with_plain_transformers(tmp_path):
    lm, w = tiny_lm(), windows()
    plan = lp.plan(lm, width=0.3, allocation="uniform", scores=lp.score(lm, "flap", w, progress=False))
    counts = lp.apply(lm, plan, w, progress=False)
    assert counts["standard_config"] and counts["bias_compensation"]
    probe = windows(n=2, seqlen=10, seed=6).input_ids
    expected = logits(lm.model, probe)
    lp.export(lm, tmp_path / "out", plan)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert plain.config.attention_bias and plain.config.mlp_bias
    assert not hasattr(plain.config, BLOCK_CONFIGS_KEY)
    assert plain.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    assert torch.equal(logits(plain, probe), expected)


def test_flap_cli(tmp_path, cli):
    s, p, out = tmp_path / "flap.json", tmp_path / "plan.json", tmp_path / "narrow"
    r = cli("score", "fixture", "--method", "flap", "--unit", "module", "--samples", "4", "--seqlen", "32",
            "--quiet", "--no-plot", "-o", s)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = cli(
        "plan",
        "fixture",
        "--width",
        "0.3",
        "--allocation",
        "flap",
        "--scores",
        s,
        "--quiet",
        "--no-plot",
        "-o",
        p,
    )
    assert r.returncode == 0, r.stderr
    assert "flap allocation, flap scores" in r.stdout
    r = cli("apply", p, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    r = cli("plan", "fixture", "--width", "0.3", "--allocation", "flap", "--pruner", "wanda-sp", "--samples", "4",
            "--seqlen", "32", "-o", p)  # fmt: skip
    assert r.returncode == 2 and "ranks FLAP scores" in r.stderr


def test_search_fitness_with_flap_scores_is_the_compensated_model():
    """A searched allocation over FLAP scores evaluates each candidate with the compensation."""
    from layerprune.evaluation.perplexity import perplexity_of_windows as ppl
    from layerprune.models.width_decisions import counts
    from layerprune.planners.width_search import Fitness

    lm, w = tiny_lm(), windows()
    s = lp.score(lm, "flap", w, progress=False)
    rates = [0.6, 0.2, 0.4, 0.3]
    fit = Fitness(lm, s.extra, w).one(rates)
    masks = masks_for(counts(rates, budgets(lm.adapter)), s.extra)
    add_output_biases(lm.adapter, compensation(lm.adapter, masks, s.extra["means"]))
    shrink(lm, masks)
    assert fit == pytest.approx(ppl(lm.model, lm.adapter, w, 8, progress=False).ppl, rel=1e-5)
