"""Shapley layer contributions: closed forms, convergence, resumability, bad input, Mamba."""

import json
import math
import warnings

import pytest
import scipy.stats
import torch

from layerprune.data import Windows
from layerprune.engine.store import EvalStore
from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.tiny import tiny_model
from layerprune.scorers.shapley import score as shapley
from layerprune.scorers.shapley.game import (
    all_masks,
    exact_shapley,
    kernel_shap,
    permutation_shapley,
    stratified_contributions,
)
from layerprune.scorers.shapley.masks import default_strata, stratified_masks


def synthetic(L, seed, triple=False):
    """v(S) = sum a_i + sum b_ij + (optionally) sum c_ijk over members of S, with its Shapley values:
    every term is shared equally by its members."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, generator=g, dtype=torch.float64)
    b = torch.randn(L, L, generator=g, dtype=torch.float64).triu(1)
    c = (
        torch.randn(L, L, L, generator=g, dtype=torch.float64)
        if triple
        else torch.zeros(L, L, L, dtype=torch.float64)
    )
    i, j, k = torch.meshgrid(torch.arange(L), torch.arange(L), torch.arange(L), indexing="ij")
    c = c * ((i < j) & (j < k))

    def f(m):
        m = m.double()
        return m @ a + ((m @ b) * m).sum(1) + torch.einsum("ni,nj,nk,ijk->n", m, m, m, c)

    phi = a + (b.sum(0) + b.sum(1)) / 2 + (c.sum((1, 2)) + c.sum((0, 2)) + c.sum((0, 1))) / 3
    return f, phi


def test_exact_enumeration_matches_the_closed_form():
    for triple in (False, True):
        f, phi = synthetic(7, 1, triple)
        assert torch.allclose(exact_shapley(f(all_masks(7)), 7), phi, atol=1e-10)


def test_pairwise_games_are_exact_for_antithetic_and_paired_sampling():
    f, phi = synthetic(9, 2)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(permutation_shapley(f, 9, 2, g), phi, atol=1e-10)  # one order + its reverse
    assert torch.allclose(kernel_shap(f, 9, 200, g), phi, atol=1e-8)


def test_sampling_estimators_converge_on_a_game_with_triple_interactions():
    f, phi = synthetic(10, 3, triple=True)
    for estimate in (permutation_shapley, kernel_shap):
        errors = []
        for n in (50, 500, 20000):
            g = torch.Generator().manual_seed(n)
            errors.append(float((estimate(f, 10, n, g) - phi).abs().max()))
        assert errors[2] < errors[0] and errors[2] < 0.05 * float(phi.abs().max()), (
            estimate.__name__,
            errors,
        )


def test_stratified_estimator_is_the_semivalue_over_its_strata():
    f, _ = synthetic(6, 4, triple=True)
    masks = all_masks(6)
    # over all masks it is the Banzhaf value: mean marginal contribution over all coalitions
    brute = torch.zeros(6, dtype=torch.float64)
    for i in range(6):
        without = masks[masks[:, i] == 0]
        with_i = without.clone()
        with_i[:, i] = 1
        brute[i] = (f(with_i) - f(without)).mean()
    assert torch.allclose(stratified_contributions(f, masks), brute, atol=1e-12)


def test_strata():
    assert default_strata(32, 0.25) == [30, 27, 24, 21, 18]  # the reference's hard-coded strata
    assert default_strata(12, 0.25) == [11, 10, 9, 8, 7]
    masks = stratified_masks(12, [11, 9, 7], 60, seed=0)
    assert len(masks) == len(set(masks)) == 60
    assert {sum(m) for m in masks} == {11, 9, 7}
    assert sum(1 for m in masks if sum(m) == 11) == 12  # the stratum of 12 masks is taken whole
    assert masks == stratified_masks(12, [11, 9, 7], 60, seed=0)


def windows(n=3, t=12):
    g = torch.Generator().manual_seed(0)
    return Windows(torch.randint(3, 128, (n, t), generator=g), {"fingerprint": "tiny"})


def test_exact_estimator_equals_brute_force_on_a_tiny_model():
    model = tiny_model("llama", num_layers=4)
    adapter = ModelAdapter(model)
    w = windows()
    result = shapley(model, adapter, w, estimator="exact", progress=False)

    def ppl(mask):
        blocks = adapter.blocks
        kept = [b for b, k in zip(blocks, mask) if k]
        saved = list(blocks)
        try:  # an independent skip: rebuild the ModuleList with only the kept blocks
            adapter.model.model.layers = torch.nn.ModuleList(kept)
            adapter.model.config.num_hidden_layers = len(kept)
            with torch.no_grad():
                losses = [
                    model(input_ids=x[None], labels=x[None], use_cache=False).loss.item() for x in w.input_ids
                ]
        finally:
            adapter.model.model.layers = torch.nn.ModuleList(saved)
            adapter.model.config.num_hidden_layers = 4
        return math.exp(sum(losses) / len(losses))

    dense = ppl([1, 1, 1, 1])
    table = torch.tensor(
        [dense / ppl([(r >> i) & 1 for i in range(4)]) for r in range(16)], dtype=torch.float64
    )
    # float32 losses (HF mean vs our log-softmax sums) agree to ~1e-7; their differences to ~1e-6
    assert result.importance == pytest.approx(exact_shapley(table, 4).tolist(), abs=2e-6)
    assert result.extra["evaluations"] == 16


def skipping_utilities(model, w, masks):
    """PPL(dense) / PPL(only the blocks of the mask) for every mask, by rebuilding the ModuleList
    (not through the adapter). Equal-length windows: the mean loss of the batch is the token mean."""
    layers, n = model.model.layers, model.config.num_hidden_layers

    def ppl():
        with torch.no_grad():
            return math.exp(float(model(input_ids=w.input_ids, labels=w.input_ids, use_cache=False).loss))

    dense, out = ppl(), []
    try:
        for mask in masks:
            model.model.layers = torch.nn.ModuleList([b for b, k in zip(layers, mask) if k])
            model.config.num_hidden_layers = len(model.model.layers)
            out.append(dense / ppl())
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, n
    return torch.tensor(out, dtype=torch.float64)


def test_surrogate_estimators_report_fit_and_budget(monkeypatch):
    import layerprune.scorers.shapley as shapley_module

    model = tiny_model("qwen3", num_layers=6)
    adapter = ModelAdapter(model)
    fits = []
    real_fit = shapley_module.fit_surrogate

    def recording_fit(masks, values, **kwargs):
        fits.append((masks, values, real_fit(masks, values, **kwargs)))
        return fits[-1][2]

    monkeypatch.setattr(shapley_module, "fit_surrogate", recording_fit)
    for estimator in ("stratified", "shapley", "kernel"):
        fits.clear()
        r = shapley(
            model,
            adapter,
            windows(),
            estimator=estimator,
            budget=40,
            strata=[5, 4, 3, 2],
            progress=False,
            epochs=60,
        )
        assert len(r.importance) == 6 and all(math.isfinite(v) for v in r.importance)
        assert r.extra["evaluations"] <= 41  # the budget, plus the dense model
        if estimator == "kernel":
            assert not fits and "surrogate" not in r.extra
            continue
        reported = r.extra["surrogate"]
        ((masks, values, fit),) = fits
        assert reported["heldout"] == 8 and len(masks) == 40 and fit.heldout_index.shape == (8,)
        # The held-out fit, recomputed: true utilities of the held-out masks from plain forwards of
        # the model with the other blocks dropped, the surrogate's predictions, scipy's statistics.
        held = masks[fit.heldout_index]
        truth = skipping_utilities(model, windows(), held.long().tolist())
        assert truth.tolist() == pytest.approx(values[fit.heldout_index].tolist(), rel=1e-5)
        assert float(torch.pdist(truth[:, None]).min()) > 1e-4  # the true ranks are not up to rounding
        pred = fit(held).float().double().numpy()
        assert reported["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, truth.numpy())[0], abs=1e-12)
        sse, sst = ((pred - truth.numpy()) ** 2).sum(), ((truth.numpy() - truth.numpy().mean()) ** 2).sum()
        assert reported["r2"] == pytest.approx(1 - sse / sst, rel=1e-4, abs=1e-5)


def test_spearman_ranks_ties_by_their_mean():
    from layerprune.scorers.shapley.surrogate import spearman

    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean ranks of a: 1, 3, 3, 3, 5 -> centred (-2, 0, 0, 0, 2) against (-2, -1, 0, 1, 2): 8 / sqrt(80)
    assert spearman(a, b) == pytest.approx(2 / math.sqrt(5), abs=1e-12)

    def naive(x, y):  # ranks by position in a sorted order: ties get distinct ranks
        rx, ry = (v.argsort(stable=True).argsort(stable=True).double() for v in (x, y))
        rx, ry = rx - rx.mean(), ry - ry.mean()
        return float((rx * ry).sum() / (rx.norm() * ry.norm()))

    assert naive(a, b) == pytest.approx(1.0)  # the three tied values, ranked in order, look monotone
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (50,), generator=g).double()  # heavy ties on both sides
    y = (x + torch.randint(0, 3, (50,), generator=g)).float()
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert abs(spearman(x, y) - naive(x, y)) > 0.01
    assert spearman(y, y) == pytest.approx(1.0)
    # undefined: a constant side or fewer than two values -> NaN (saved as null), no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman(torch.ones(5), b)) and math.isnan(spearman(b, torch.ones(5)))
        assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))


def test_interrupted_run_resumes_without_reevaluating(tmp_path):
    from layerprune.models.loading import LoadedModel
    from layerprune.scorers.run import run

    model = tiny_model("llama", num_layers=6)
    lm = LoadedModel("tiny", model, None, ModelAdapter(model), None)
    w = windows()
    path = tmp_path / "store.sqlite"
    kwargs = dict(estimator="stratified", budget=30, strata=[5, 4, 3], epochs=40, progress=False)

    class Crash(Exception):
        pass

    store = EvalStore(path, lm.fingerprint, w.fingerprint)
    real_put = store.put
    calls = []

    def put(*a, **k):
        real_put(*a, **k)
        calls.append(a[0])
        if len(calls) == 11:
            raise Crash

    store.put = put
    with pytest.raises(Crash):
        run(lm, "shapley", w, store=store, **kwargs)
    store.close()

    store = EvalStore(path, lm.fingerprint, w.fingerprint)
    resumed = run(lm, "shapley", w, store=store, **kwargs)
    assert resumed.extra["evaluations_this_run"] == 31 - 11  # 30 masks + the dense model, 11 stored
    fresh = run(lm, "shapley", w, **kwargs)
    a, b = resumed.to_dict(), fresh.to_dict()
    for d in (a, b):  # wall time, timestamps and this run's share of the work differ by nature
        d.pop("seconds"), d["provenance"].pop("created"), d["extra"].pop("evaluations_this_run")
        d["extra"].pop("block_calls")  # the block forwards this run needed (fewer after a resume)
        d["params"].pop("store", None)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_bad_input():
    model = tiny_model("llama", num_layers=5)
    adapter = ModelAdapter(model)
    with pytest.raises(LayerpruneError, match="cannot cover 5 strata"):
        shapley(model, adapter, windows(), budget=3, strata=[4, 3, 2, 1, 1])
    with pytest.raises(LayerpruneError, match=r"strata \[5, 0\] are outside 1..4"):
        shapley(model, adapter, windows(), strata=[5, 3, 0])
    big = tiny_model("llama", num_layers=17)
    with pytest.raises(LayerpruneError, match="use --estimator stratified or shapley"):
        shapley(big, ModelAdapter(big), windows(), estimator="exact")


def test_mamba_depth_pruning_by_shapley(tmp_path):
    from transformers import AutoModelForCausalLM

    from layerprune.models.loading import LoadedModel
    from layerprune.planners.depth import make_plan
    from layerprune.pruners.depth import apply
    from layerprune.scorers.run import run

    model = tiny_model("mamba", num_layers=5)
    lm = LoadedModel("tiny-mamba", model, None, ModelAdapter(model), None)
    scores = run(lm, "shapley", windows(), estimator="exact", progress=False)
    plan = make_plan(scores, remove=2)
    lowest = sorted(range(5), key=lambda i: scores.importance[i])[:2]
    assert plan.remove == [str(i) for i in sorted(lowest)]
    apply(lm, plan)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 3
    out = reloaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_step_schedule_fits_a_small_budget_the_reference_schedule_underfits():
    """A multiplicative layer game like a real model's (one block ruinous to remove, the others
    costing a few percent): 160 masks of 12 blocks. The surrogate's Shapley values (exact, by
    enumerating the surrogate) are compared with the game's exact Shapley values."""
    from layerprune.scorers.shapley.game import all_masks, exact_shapley
    from layerprune.scorers.shapley.surrogate import fit_surrogate, spearman

    L = 12
    g = torch.Generator().manual_seed(3)
    cost = 0.01 + 0.08 * torch.rand(L, generator=g, dtype=torch.float64)
    cost[0] = 4.0  # removing block 0 is ruinous, as in trained models

    def utility(m):
        return torch.exp(-((1 - m.double()) @ cost))

    truth = exact_shapley(utility(all_masks(L)), L)
    masks = torch.tensor(stratified_masks(L, default_strata(L, 0.25), 160, seed=0), dtype=torch.float64)
    fits = {s: fit_surrogate(masks, utility(masks), schedule=s) for s in ("steps", "reference")}
    rho = {s: spearman(exact_shapley(f(all_masks(L)), L), truth) for s, f in fits.items()}
    assert fits["steps"].r2 > 0.95 and rho["steps"] > 0.9
    assert fits["reference"].r2 < fits["steps"].r2 and rho["reference"] < rho["steps"]
    with pytest.raises(LayerpruneError, match="steps or reference"):
        fit_surrogate(masks, utility(masks), schedule="adam")


def test_the_surrogate_fits_a_real_llm_game_whose_utilities_span_six_decades():
    """The 256 masks a real Shapley run evaluated on SmolLM2-135M (tests/scorers/data/): removing
    block 0 or 1 divides the utility by ~10^4, so 40% of the utilities are below 1e-3. At the one
    learning rate the surrogate had before, its sigmoid saturated at 0 for every mask (held-out
    R^2 -0.22, Spearman -0.62, every contribution 0). Checked against the recorded evaluations
    themselves: held-out fit, and the vital blocks ranked first as the raw data ranks them."""
    from pathlib import Path

    from layerprune.scorers.shapley.game import stratified_contributions
    from layerprune.scorers.shapley.surrogate import fit_surrogate

    game = json.loads((Path(__file__).parent / "data" / "smollm2_shapley_game.json").read_text())
    keys = sorted(game["masks"])
    masks = torch.tensor([[int(b) for b in k] for k in keys], dtype=torch.float64)
    values = torch.tensor([math.exp((game["dense_nll"] - game["masks"][k]) / game["tokens"]) for k in keys])
    assert (values < 1e-3).double().mean() > 0.35  # the hard case, as recorded
    fit = fit_surrogate(masks, values.double())
    assert fit.r2 > 0.9 and fit.spearman > 0.9, (fit.r2, fit.spearman)
    phi = stratified_contributions(
        fit, torch.tensor(stratified_masks(30, [28, 26, 24, 21, 19], 4000, 1)).double()
    )
    # raw evidence, no surrogate: mean utility of the masks keeping block i minus those removing it
    direct = torch.stack(
        [values[masks[:, i] == 1].mean() - values[masks[:, i] == 0].mean() for i in range(30)]
    )
    top = set(torch.argsort(direct, descending=True)[:2].tolist())
    assert set(torch.argsort(phi, descending=True)[:2].tolist()) == top == {0, 1}
    assert scipy.stats.spearmanr(phi.numpy(), direct.numpy()).statistic > 0.6


def test_the_surrogate_is_the_same_bits_under_any_thread_count_and_restores_the_callers():
    """torchrun gives each rank one thread, a lone process all cores: the surrogate's fit and its
    predictions must not depend on that (a float reduction's order does), and the caller's thread
    count comes back. Reference: the fit made inside an explicit single-thread region."""
    from layerprune.scorers.shapley.game import stratified_contributions
    from layerprune.scorers.shapley.surrogate import fit_surrogate

    L = 30
    masks = torch.tensor(stratified_masks(L, [28, 26, 24, 21, 19], 200, seed=0), dtype=torch.float64)
    values = torch.exp(-(1 - masks).sum(1) / 10)
    fresh = torch.tensor(stratified_masks(L, [28, 26, 24, 21, 19], 4000, seed=1), dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            fit = fit_surrogate(masks, values, epochs=300)
            assert torch.get_num_threads() == threads
            runs.append((fit(fresh), stratified_contributions(fit, fresh)))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for pred, phi in runs[1:]:
        assert torch.equal(pred, runs[0][0]) and torch.equal(phi, runs[0][1])
