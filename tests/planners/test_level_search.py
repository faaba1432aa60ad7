"""EvoPress searches: sparsity levels and depth sets. The engine against exhaustive enumeration, the
mean constraint over many mutations, the level database against the pruner applied to one layer
alone, kill and resume, and bad input."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import LoadedModel
from layerprune.models.tiny import VOCAB, tiny_model
from layerprune.planners.depth_search import search_plan as depth_search
from layerprune.planners.search.levels import LevelSpace, search_levels
from layerprune.planners.sparsity_search import LevelFitness, level_grid, search_plan, stage_windows
from layerprune.pruners.levels import build_levels
from layerprune.pruners.unstructured import prune

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(blocks=3, seed=0) -> LoadedModel:
    model = tiny_model("llama", num_layers=blocks, seed=seed)
    return LoadedModel(
        name=f"tiny{seed}", model=model, tokenizer=None, adapter=ModelAdapter(model), path=None
    )


def windows(n=8, seqlen=24, seed=1):
    from layerprune.data import Windows

    ids = torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    protocol = {"dataset": "random", "seed": seed, "fingerprint": f"rand{n}x{seqlen}s{seed}"}
    return Windows(ids, protocol)


# ---- the engine ------------------------------------------------------------------------------------
def all_genomes(space: LevelSpace):
    ranges = [range(lo, hi + 1) for lo, hi in zip(space.lo, space.hi)]
    return [g for g in itertools.product(*ranges) if sum(g) == space.total]


@pytest.mark.parametrize("trial", range(5))
def test_the_search_finds_the_exhaustive_optimum_of_a_small_game(trial):
    space = LevelSpace((-1, -1, -1), (1, 1, 1), 0)  # 3 units, 3 levels: 7 genomes
    rng = random.Random(trial)
    table = {g: rng.random() for g in all_genomes(space)}
    noise = {g: rng.gauss(0, 0.02) for g in table}  # the early stage (fewer tokens) sees a noisy value

    def fitness(stage, genomes):
        return [table[g] + (noise[g] if stage == 0 else 0.0) for g in genomes]

    best = min(table, key=table.get)
    r = search_levels(space, fitness, seeds={"uniform": (0, 0, 0)}, generations=30, offspring=4,
                      survivors=(2,), seed=trial, progress=False)  # fmt: skip
    assert r.best == best and r.best_fitness == table[best]


def test_every_mutation_keeps_the_sum_and_the_bounds():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 9)
        lo = tuple(-rng.randint(0, 4) for _ in range(n))
        hi = tuple(rng.randint(0, 4) for _ in range(n))
        space = LevelSpace(lo, hi, 0)
        g = (0,) * n
        for _ in range(40):
            g = space.mutate(g, rng)
            assert sum(g) == 0 and all(a <= v <= b for a, v, b in zip(lo, g, hi))


def test_every_candidate_meets_the_target_sparsity():
    lm = tiny_lm()
    for granularity in ("layer", "block"):
        grid = level_grid(lm, 0.6, step=0.1, granularity=granularity, max_levels=4)
        numel = {n: lm.adapter.layer(n).weight.numel() for n in lm.adapter.layer_names()}
        step = max(grid.delta / n for n in grid.numel)
        rng = random.Random(1)
        g = (0,) * len(grid.units)
        for _ in range(200):
            g = grid.space.mutate(g, rng)
            t = grid.targets(g)
            mean = sum(t[n] * numel[n] for n in t) / sum(numel.values())
            assert abs(mean - 0.6) < 1e-9 < step  # exact: the level steps are the same count of weights
            assert all(0 <= s <= 0.95 for s in t.values())


# ---- the level database ------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", ["target", "dense"])
@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
def test_a_database_entry_is_the_pruner_applied_to_that_layer_alone(tmp_path, pruner, inputs):
    """The entry of layer (b, role) at sparsity s = `prune` of a fresh copy with that layer at s and,
    for inputs='target', every layer of the blocks before b at the target (dense ones otherwise)."""
    lm, w = tiny_lm(), windows()
    grid = level_grid(lm, 0.5, step=0.2, granularity="layer", max_levels=2)
    wanted = grid.layer_sparsities()
    db = build_levels(lm, pruner, wanted, w, tmp_path / "db", target=0.5, inputs=inputs, progress=False)
    dense = {n: lm.adapter.weight(lm.adapter.layer(n)).detach().clone() for n in wanted}
    for name in ("0.q", "1.down", "2.k"):
        s = wanted[name][-1]
        block = int(name.split(".")[0])
        before = {n: 0.5 for n in wanted if int(n.split(".")[0]) < block} if inputs == "target" else {}
        alone = tiny_lm()  # the same weights
        prune(alone.model, alone.adapter, w.input_ids, {**before, name: s}, pruner, progress=False)
        expected = alone.adapter.weight(alone.adapter.layer(name))
        torch.testing.assert_close(db.weight(name, s), expected, rtol=0, atol=1e-5)
        assert torch.equal(db.weight(name, None), dense[name])
    # the model it was built from is dense again
    for n, d in dense.items():
        assert torch.equal(lm.adapter.weight(lm.adapter.layer(n)), d)
    assert db.manifest["inputs"] == ("dense" if pruner == "magnitude" else inputs)


def test_a_database_of_another_model_or_pruner_is_refused(tmp_path):
    lm, w = tiny_lm(), windows()
    grid = level_grid(lm, 0.5, step=0.2)
    build_levels(lm, "wanda", grid.layer_sparsities(), w, tmp_path / "db", target=0.5, progress=False)
    other = tiny_lm(seed=3)
    other._fingerprint = "another"
    with pytest.raises(LayerpruneError, match="was built for model .* choose a new --levels-db"):
        build_levels(other, "wanda", grid.layer_sparsities(), w, tmp_path / "db", target=0.5, progress=False)
    with pytest.raises(LayerpruneError, match="holds wanda levels, not sparsegpt"):
        build_levels(lm, "sparsegpt", grid.layer_sparsities(), w, tmp_path / "db", target=0.5, progress=False)
    finer = level_grid(lm, 0.5, step=0.1).layer_sparsities()
    with pytest.raises(LayerpruneError, match="lacks sparsities"):
        build_levels(lm, "wanda", finer, w, tmp_path / "db", target=0.5, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(LayerpruneError, match="is not a level database"):
        build_levels(lm, "wanda", grid.layer_sparsities(), w, tmp_path / "junk", target=0.5, progress=False)


def test_a_grid_that_cannot_reach_the_target_is_refused():
    lm = tiny_lm()
    for bad, match in ((0.97, "cannot be searched"), (0.0, "cannot be searched")):
        with pytest.raises(LayerpruneError, match=match):
            level_grid(lm, bad)
    with pytest.raises(LayerpruneError, match="must be a step"):
        level_grid(lm, 0.5, step=1.5)


# ---- the sparsity search on a tiny model ------------------------------------------------------------
def test_the_sparsity_search_finds_the_exhaustive_optimum_on_a_tiny_model(tmp_path):
    lm, w = tiny_lm(), windows()
    grid = level_grid(lm, 0.5, step=0.2, granularity="block", max_levels=1)  # 3 blocks, 3 levels
    assert grid.space.lo == (-1, -1, -1) and grid.space.hi == (1, 1, 1)
    db = build_levels(lm, "wanda", grid.layer_sparsities(), w, tmp_path / "db", target=0.5, progress=False)
    fit = LevelFitness(lm, grid, db, w, stage_windows(8, 2))
    genomes = all_genomes(grid.space)
    truth = dict(zip(genomes, fit(1, genomes)))
    best = min(truth, key=truth.get)
    plan = search_plan(lm, grid, db, "wanda", w, w, seeds={}, generations=12, offspring=3, survivors=(2,),
                       progress=False)  # fmt: skip
    assert tuple(plan.extra["levels"]) == best
    assert plan.extra["best_fitness"] == pytest.approx(truth[best], rel=1e-9)
    assert plan.params["achieved"] == pytest.approx(0.5, abs=1e-12)
    plan.check(lm)  # an ordinary sparsity plan of this model
    assert db.current == {}  # the model is dense again
    # applied from its database: exactly the model the search evaluated
    import layerprune as lp

    stitched = tiny_lm()
    counts = lp.apply(stitched, plan, levels_db=tmp_path / "db")
    for n, target in plan.layers.items():
        weight = stitched.adapter.weight(stitched.adapter.layer(n))
        assert torch.equal(weight, db.weight(n, target)) and counts["layers"][n]["achieved"] == pytest.approx(
            target, abs=0.02
        )
    with pytest.raises(LayerpruneError, match="needs no calibration"):
        lp.apply(tiny_lm(), plan, w, levels_db=tmp_path / "db")


def test_a_killed_search_resumes_from_its_store_as_if_never_stopped(tmp_path, monkeypatch):
    lm, w = tiny_lm(), windows()
    grid = level_grid(lm, 0.5, step=0.2, granularity="layer", max_levels=2)
    db = build_levels(lm, "magnitude", grid.layer_sparsities(), None, tmp_path / "db", progress=False)
    kw = dict(seeds={}, generations=4, offspring=4, survivors=(2,), seed=7, progress=False)
    whole = search_plan(lm, grid, db, "magnitude", None, w, **kw)
    calls, real = [0], LevelFitness.total

    def dying(self, genome, stage):
        calls[0] += 1
        if calls[0] > 9:
            raise KeyboardInterrupt
        return real(self, genome, stage)

    monkeypatch.setattr(LevelFitness, "total", dying)
    with pytest.raises(KeyboardInterrupt):
        search_plan(lm, grid, db, "magnitude", None, w, store=tmp_path / "s.db", **kw)
    monkeypatch.setattr(LevelFitness, "total", real)
    resumed = search_plan(lm, grid, db, "magnitude", None, w, store=tmp_path / "s.db", **kw)
    assert resumed.layers == whole.layers and resumed.extra["best_fitness"] == whole.extra["best_fitness"]
    assert resumed.extra["evaluations_this_run"] == whole.extra["evaluations_this_run"] - 9
    assert all(
        torch.equal(lm.adapter.weight(lm.adapter.layer(n)), db.weight(n, None)) for n in grid.layer_numel
    )


# ---- depth ----------------------------------------------------------------------------------------
def test_the_depth_search_finds_the_best_removal_set(tmp_path):
    from layerprune.engine.masked import MaskEvaluator

    lm, w = tiny_lm(blocks=5), windows()
    ev = MaskEvaluator(lm.model, lm.adapter, w.input_ids, progress=False)
    sets = list(itertools.combinations(range(5), 2))
    nll = ev.nll([[0 if j in s else 1 for j in range(5)] for s in sets])
    best = sets[min(range(len(sets)), key=nll.__getitem__)]
    plan = depth_search(lm, 2, w, generations=15, offspring=4, survivors=(2,), random_initial=1,
                        log=tmp_path / "log.jsonl", progress=False)  # fmt: skip
    assert plan.remove == [str(b) for b in best]
    assert plan.extra["best_fitness"] == pytest.approx(min(nll) / ev.tokens, rel=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["generation"] for x in lines] == list(range(16))


def test_a_depth_search_refuses_impossible_counts():
    lm, w = tiny_lm(blocks=3), windows()
    with pytest.raises(LayerpruneError, match="keep at least one"):
        depth_search(lm, 3, w, progress=False)
    with pytest.raises(LayerpruneError, match="not protected"):
        depth_search(lm, 2, w, protect="0,1", progress=False)


# ---- LLM operators (a scripted local OpenAI-compatible server) ---------------------------------------
def llm_config(url):
    from layerprune.planners.search import LLMConfig

    return LLMConfig(url=url, model="scripted", key_env="LAYERPRUNE_TEST_KEY", timeout=5, max_retries=0)


def test_llm_level_proposals_are_used_repaired_or_replaced(tmp_path):
    from scripted import ScriptedServer

    space = LevelSpace((-1,) * 4, (1,) * 4, 0)
    reply = {"children": [[1, -1, 0, 0], [1, -1, 0, 0], [2, 0, -1, 0], [1, 1, 0, 0], ["a", 0, 0, 0], [0, 0]]}
    evaluated = []

    def fitness(stage, genomes):
        evaluated.extend(genomes)
        return [sum((v - t) ** 2 for v, t in zip(g, (1, 0, -1, 0))) for g in genomes]

    with ScriptedServer([json.dumps(reply), 500]) as server:
        r = search_levels(space, fitness, seeds={"uniform": (0,) * 4}, generations=2, offspring=6, survivors=(6,),
                          operators="llm", llm=llm_config(server.url), describe="a toy", log_path=tmp_path / "l.jsonl",
                          progress=False)  # fmt: skip
    assert len(server.requests) == 2
    prompt = server.requests[0]["body"]["messages"][1]["content"]
    assert "a toy" in prompt and "sum to 0" in prompt and "Parent (fitness 2)" in prompt
    assert (1, -1, 0, 0) in evaluated and (1, 0, -1, 0) in evaluated  # used as is; clipped into range
    s = r.stats
    assert s["llm_children"] == 3 and s["duplicate_replaced"] == 1 and s["out_of_range_repaired"] == 1
    assert s["sum_repaired"] == 1 and s["not_integers"] == 1 and s["wrong_length"] == 1
    assert s["request_failed"] == 1 and s["classic_fallback"] == 3 + 6  # three in generation 1, all six in 2
    assert r.best == (1, 0, -1, 0) and r.best_fitness == 0
    lines = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert lines[1]["llm_replies"][0]["purpose"] == "children" and "error" in lines[2]["llm_replies"][0]


def test_llm_depth_proposals_are_sets_of_removable_units():
    from scripted import ScriptedServer

    space = LevelSpace((0,) * 4, (1, 1, 1, 0), 2)  # unit 3 protected
    with ScriptedServer([json.dumps({"children": [[0, 1], [0, 3]]})]) as server:
        r = search_levels(space, lambda st, gs: [float(sum(i * v for i, v in enumerate(g))) for g in gs],
                          seeds={"a": (0, 1, 1, 0)}, generations=1, offspring=2, survivors=(), operators="llm",
                          llm=llm_config(server.url), as_set=True, progress=False)  # fmt: skip
    prompt = server.requests[0]["body"]["messages"][1]["content"]
    assert "exactly 2 distinct unit indices" in prompt and "units [3] may not be removed" in prompt
    assert r.best == (1, 1, 0, 0) and r.stats["out_of_range_repaired"] == 1 and r.stats["sum_repaired"] == 1


def test_a_killed_depth_search_resumes_from_its_store(tmp_path, monkeypatch):
    import layerprune.engine.masked as masked

    lm, w = tiny_lm(blocks=6), windows()
    kw = dict(generations=4, offspring=4, survivors=(2,), random_initial=2, seed=3, progress=False)
    whole = depth_search(lm, 2, w, **kw)
    calls, real = [0], masked.evaluate_masks

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(masked, "evaluate_masks", dying)
    with pytest.raises(KeyboardInterrupt):
        depth_search(lm, 2, w, store=tmp_path / "d.db", **kw)
    monkeypatch.setattr(masked, "evaluate_masks", real)
    with sqlite3.connect(tmp_path / "d.db") as c:
        stored = c.execute("SELECT COUNT(*) FROM evals").fetchone()[0]
    resumed = depth_search(lm, 2, w, store=tmp_path / "d.db", **kw)
    assert resumed.remove == whole.remove and resumed.extra["best_fitness"] == whole.extra["best_fitness"]
    assert (
        stored > 0 and resumed.extra["evaluations_this_run"] == whole.extra["evaluations_this_run"] - stored
    )


def _depth_plan(lm, blocks, method="given", unit="block"):
    from layerprune.plans import DepthPlan
    from layerprune.scorers.run import model_info

    return DepthPlan(model=model_info(lm), method=method, remove=[str(b) for b in blocks], unit=unit)


def test_a_depth_search_starts_from_given_plans_as_they_are():
    """Seed plans enter as their own removal sets: with no generation the search returns the best
    of them, its fitness the brute-force NLL per token of that set."""
    from layerprune.engine.masked import MaskEvaluator

    lm, w = tiny_lm(blocks=5), windows()
    ev = MaskEvaluator(lm.model, lm.adapter, w.input_ids, progress=False)
    sets = [(0, 4), (1, 3), (2, 3)]
    nll = ev.nll([[0 if j in s else 1 for j in range(5)] for s in sets])
    plans = {f"p{s}": _depth_plan(lm, s) for s in sets}
    plan = depth_search(lm, 2, w, seed_plans=plans, generations=0, progress=False)
    best = min(range(3), key=nll.__getitem__)
    assert plan.remove == [str(b) for b in sets[best]] and plan.extra["start"] == f"p{sets[best]}"
    assert plan.extra["seeds_fitness"] == pytest.approx(
        {f"p{s}": v / ev.tokens for s, v in zip(sets, nll)}, rel=1e-9
    )


def test_a_seed_plan_the_search_cannot_start_from_is_refused():
    lm, w = tiny_lm(blocks=5), windows()
    cases = [
        (_depth_plan(lm, (1, 2, 3)), {}, "removes 3 units, not 2"),
        (_depth_plan(tiny_lm(blocks=5, seed=1), (1, 2)), {}, "made for model"),
        (_depth_plan(lm, (0, 2)), {"protect": "0"}, "removes protected units"),
        (_depth_plan(lm, ("1.attn", "2.mlp"), unit="module"), {}, "search with --unit module"),
    ]
    for p, options, message in cases:
        with pytest.raises(LayerpruneError, match=message):
            depth_search(lm, 2, w, seed_plans={"x": p}, generations=0, progress=False, **options)


def test_seed_plan_files_replace_the_computed_ppl_and_bi_seeds(tmp_path, monkeypatch):
    """`plan --remove K --allocation search --seed-scores a.json b.json` with depth plans: no scorer
    runs when plans named ppl and bi are given; a sparsity plan is refused."""
    import layerprune as lp
    import layerprune.scorers.run

    lm = lp.load("fixture", quiet=True)
    files = []
    for method, blocks in (("ppl", (3, 7)), ("bi", (5, 8))):
        files.append(_depth_plan(lm, blocks, method).save(tmp_path / f"{method}.json"))

    def no_scorer(*a, **k):
        raise AssertionError("a seed was scored although a plan of its name was given")

    monkeypatch.setattr(layerprune.scorers.run, "run", no_scorer)
    plan = lp.plan(lm, remove=2, allocation="search", calib="fixture:val", fitness_samples=2, fitness_seqlen=32,
                   seed_scores=files, generations=0, progress=False)  # fmt: skip
    assert set(plan.extra["seeds_fitness"]) == {"ppl", "bi"}
    assert plan.remove in (["3", "7"], ["5", "8"])
    # a plan the search cannot start from is refused before any seed is scored (no_scorer never runs)
    with pytest.raises(LayerpruneError, match="removes 2 units, not 3"):
        lp.plan(lm, remove=3, allocation="search", calib="fixture:val", fitness_samples=2, fitness_seqlen=32,
                seed_scores=[files[0]], generations=0, progress=False)  # fmt: skip
    sparse = lp.plan(lm, sparsity=0.5, allocation="uniform", pruner="magnitude", progress=False)
    sparse.save(tmp_path / "sparse.json")
    with pytest.raises(LayerpruneError, match="cannot seed a depth search"):
        lp.plan(lm, remove=2, allocation="search", calib="fixture:val", fitness_samples=2, fitness_seqlen=32,
                seed_scores=[tmp_path / "sparse.json"], generations=0, progress=False)  # fmt: skip


def test_the_default_depth_fitness_is_32_windows_of_512_tokens_at_most_the_context(tmp_path):
    """The fixture's context is 256: 32 x 256 by default; a text too short for it names the flags."""
    import layerprune as lp

    lm = lp.load("fixture", quiet=True)
    # seed plans given (what the seeds are does not matter here): no ppl / bi scoring, only the fitness
    seeds = [_depth_plan(lm, b, m).save(tmp_path / f"{m}.json") for m, b in (("ppl", (3, 7)), ("bi", (5, 8)))]
    plan = lp.plan(lm, remove=2, allocation="search", calib="fixture:val", generations=0, progress=False,
                   seed_scores=seeds)  # fmt: skip
    assert plan.calibration["samples"] == 32 and plan.calibration["seqlen"] == 256
    assert plan.params["stage_windows"] == [2, 8, 32] and plan.params["survivors"] == [4, 1]
    small = tmp_path / "small.txt"  # enough for the seeds' 10 x 128, not for 32 x 256
    small.write_text(lp.load_text("fixture:val", "val").text[:16000])
    with pytest.raises(LayerpruneError, match="--fitness-samples, --fitness-seqlen"):
        lp.plan(lm, remove=2, allocation="search", calib=str(small), generations=0, progress=False)
    plan = lp.plan(lm, remove=2, allocation="search", calib=str(small), fitness_samples=4, generations=0,
                   progress=False, seed_scores=seeds)  # fmt: skip
    assert plan.calibration["samples"] == 4 and plan.calibration["dataset"] == str(small)
