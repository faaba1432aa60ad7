"""The evolutionary search of per-block rates: repair, classic operators against a quadratic whose
constrained optimum is known in closed form, determinism, resume over a store, and the LLM operators
against a scripted local OpenAI-compatible server."""

import json
import socket

import numpy as np
import pytest
from scripted import ScriptedServer

from layerprune.errors import LayerpruneError
from layerprune.planners.search import LLMConfig, plot_history, repair, search, weighted_mean

# a quadratic over the rates: sum a_i (r_i - c_i)^2, blocks 0 and 7 "important" (large a, small c)
L = 8
BETA = 0.4
W = np.array([1.0, 1, 1, 1, 2, 2, 2, 2])
A = np.array([8.0, 4, 2, 1, 1, 1, 2, 6])
C = np.array([0.1, 0.3, 0.5, 0.6, 0.5, 0.5, 0.4, 0.2])


def quadratic(rates):
    r = np.asarray(rates)
    return 10.0 + float(np.sum(A * (r - C) ** 2))


def optimum():
    """Lagrange: 2 a_i (r_i - c_i) = lambda w_i with sum w_i r_i = beta sum w_i (no bound is active)."""
    lam = (BETA * W.sum() - W @ C) / np.sum(W**2 / (2 * A))
    r = C + lam * W / (2 * A)
    assert np.all((r > 0) & (r < 0.9))
    return r


def key(rates):
    return ",".join(f"{r:.4f}" for r in rates)


def batch(rates_list):
    return [quadratic(r) for r in rates_list]


# --------------------------------------------------------------------------------------------- repair


def test_repair_is_always_feasible():
    rng = np.random.default_rng(0)
    for case in range(2000):
        n = int(rng.integers(1, 40))
        p_min = float(rng.uniform(0, 0.5)) if case % 4 else 0.0
        p_max = float(rng.uniform(p_min, 0.999)) if case % 5 else p_min + (0.999 - p_min) * rng.random()
        beta = float(rng.uniform(max(p_min, 1e-6), p_max)) if case % 7 else (p_min if p_min > 0 else p_max)
        weights = rng.integers(1, 10**7, n) if case % 2 else rng.uniform(0.01, 5, n)
        kind = case % 3
        if kind == 0:
            rates = rng.uniform(-1, 2, n)
        elif kind == 1:
            rates = rng.normal(beta, 0.3, n)
        else:
            rates = np.full(n, rng.choice([0.0, 0.99, beta]))
        out = repair(list(rates), beta, list(weights), p_min, p_max)
        assert len(out) == n
        assert abs(weighted_mean(out, weights) - beta) <= 1e-9, (case, beta, p_min, p_max)
        assert all(p_min <= r <= p_max for r in out), case


def test_repair_keeps_a_feasible_vector_and_clips_then_rescales():
    w = [1, 2, 2, 1]
    feasible = [0.2, 0.4, 0.5, 0.4]  # weighted mean 0.4
    assert repair(feasible, 0.4, w, 0.0, 0.9) == pytest.approx(feasible, abs=1e-12)
    out = repair([1.5, 0.4, 0.1, 0.3], 0.4, w, 0.0, 0.9)
    assert out[0] == 0.9 and weighted_mean(out, w) == pytest.approx(0.4, abs=1e-12)
    assert repair([0.0] * 4, 0.9, w, 0.0, 0.9) == pytest.approx([0.9] * 4)  # beta at the bound


@pytest.mark.parametrize(
    "beta, p_min, p_max, fix",
    [
        (0.05, 0.1, 0.9, "--p-min 0.05 or less"),
        (0.95, 0.0, 0.9, "--p-max 0.95 or more"),
        (0.5, 0.6, 0.4, "swap them"),
        (0.0, 0.0, 0.9, "must be in (0, 1)"),
        (1.0, 0.0, 0.9, "must be in (0, 1)"),
        (0.5, -0.1, 0.9, "must lie in [0, 1)"),
        (0.5, 0.0, 1.0, "must lie in [0, 1)"),
    ],
)
def test_repair_refuses_infeasible_targets(beta, p_min, p_max, fix):
    with pytest.raises(
        LayerpruneError, match=fix.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        repair([0.3, 0.4], beta, [1, 1], p_min, p_max)


def test_repair_refuses_bad_weights_and_rates():
    with pytest.raises(LayerpruneError, match="one weight per block"):
        repair([0.3, 0.4], 0.4, [1, 1, 1])
    with pytest.raises(LayerpruneError, match="positive"):
        repair([0.3, 0.4], 0.4, [1, 0])
    with pytest.raises(LayerpruneError, match="finite"):
        repair([0.3, float("nan")], 0.4, [1, 1])


# ------------------------------------------------------------------------------------- classic search


def test_classic_search_beats_uniform_and_approaches_the_optimum(tmp_path):
    log = tmp_path / "search.jsonl"
    result = search(L, BETA, W, batch, key, seed=0, progress=False, log_path=log)
    best, uniform = quadratic(optimum()), quadratic([BETA] * L)
    assert result.best_fitness < uniform
    assert (result.best_fitness - best) / (uniform - best) < 0.1  # 90% of the gap closed
    assert abs(result.best_rates[0] - optimum()[0]) < 0.05  # the most important block, pruned least
    assert weighted_mean(result.best_rates, W) == pytest.approx(BETA, abs=1e-9)
    assert all(0 <= r <= 0.9 for r in result.best_rates)
    assert result.evaluations == 30 + 20 * 20
    assert [h["generation"] for h in result.history] == list(range(21))
    bests = [h["best_fitness"] for h in result.history]
    assert bests == sorted(bests, reverse=True)  # elitist: never worse
    assert all(h["median_fitness"] >= h["best_fitness"] for h in result.history)

    lines = [json.loads(s) for s in log.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["start"] + ["generation"] * 21 + ["end"]
    assert lines[0]["config"]["population"] == 30
    gen0, gen1 = lines[1], lines[2]
    assert len(gen0["population"]) == 30 and len(gen1["children"]) == 20
    assert gen0["children"][0]["operator"] == "uniform"
    ops = {c["operator"] for x in lines[2:-1] for c in x["children"]}
    assert ops == {"crossover:uniform", "crossover:blend", "mutation"}
    child = gen1["children"][0]
    assert len(child["parents"]) in (1, 2) and all(
        p in {m["key"] for m in gen0["population"]} for p in child["parents"]
    )
    assert gen1["population"][0]["fitness"] <= gen0["population"][0]["fitness"]
    assert lines[-1]["best_fitness"] == result.best_fitness
    # every candidate evaluated once: keys distinct over the run
    keys = [c["key"] for x in lines[1:-1] for c in x["children"]]
    assert len(keys) == len(set(keys)) == result.evaluations

    png = plot_history(result.history, tmp_path / "history.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_enter_the_initial_population_repaired_and_deduplicated(tmp_path):
    seeds = {
        "owl": [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.3],
        "same": [BETA] * L,
        "wild": [2.0] * 4 + [0.0] * 4,
    }
    log = tmp_path / "s.jsonl"
    result = search(
        L, BETA, W, batch, key, seeds=seeds, population=10, iterations=0, progress=False, log_path=log
    )
    gen0 = [json.loads(s) for s in log.read_text().splitlines()][1]
    ops = [c["operator"] for c in gen0["children"]]
    assert ops[:3] == ["uniform", "seed:owl", "seed:wild"] and ops[3:] == ["random"] * 7
    assert result.stats["init_duplicate"] == 1  # "same" is the uniform allocation
    for c in gen0["children"]:
        assert weighted_mean(c["rates"], W) == pytest.approx(BETA, abs=1e-9)
    assert gen0["children"][2]["rates"][:4] == [0.9] * 4
    with pytest.raises(LayerpruneError, match="seed allocation 'short' has 2 rates for 8 blocks"):
        search(L, BETA, W, batch, key, seeds={"short": [0.1, 0.2]}, progress=False)
    with pytest.raises(
        LayerpruneError, match="seed allocation 'nan' holds something other than finite numbers"
    ):
        search(L, BETA, W, batch, key, seeds={"nan": [float("nan")] * L}, progress=False)


def test_a_coarse_key_never_evaluates_a_candidate_twice():
    coarse = lambda r: ",".join(f"{x:.1f}" for x in r)  # noqa: E731
    seen = []

    def evaluate(rs):
        seen.extend(coarse(r) for r in rs)
        return batch(rs)

    result = search(L, BETA, W, evaluate, coarse, population=10, iterations=10, progress=False)
    assert len(seen) == len(set(seen)) == result.evaluations
    assert result.stats["duplicate_retry"] > 0


def test_same_seed_same_search_other_seed_other_search():
    run = lambda seed: search(L, BETA, W, batch, key, seed=seed, iterations=5, progress=False)  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert a.best_rates == b.best_rates and a.history == b.history and a.population == b.population
    assert a.population != c.population


def test_a_killed_search_resumes_from_the_store():
    """evaluate backed by a store: the re-run replays the same candidates, evaluates for real only
    those the killed run did not finish, and ends with the result of an uninterrupted run."""

    class Killed(Exception):
        pass

    def store_backed(store, budget=None):
        real = {"n": 0}

        def evaluate(rs):
            out = []
            for r in rs:
                k = key(r)
                if k not in store:
                    if budget is not None and real["n"] >= budget:
                        raise Killed
                    store[k] = quadratic(r)
                    real["n"] += 1
                out.append(store[k])
            return out

        return evaluate, real

    kwargs = dict(population=12, crossovers=4, mutations=4, iterations=6, seed=7, progress=False)
    whole, whole_real = store_backed({})
    reference = search(L, BETA, W, whole, key, **kwargs)
    total = whole_real["n"]
    assert total == reference.evaluations == 12 + 6 * 8

    k = 37  # mid-generation
    store: dict = {}
    killed, killed_real = store_backed(store, budget=k)
    with pytest.raises(Killed):
        search(L, BETA, W, killed, key, **kwargs)
    assert killed_real["n"] == k == len(store)
    again, again_real = store_backed(store)
    resumed = search(L, BETA, W, again, key, **kwargs)
    assert again_real["n"] == total - k
    assert resumed.best_rates == reference.best_rates and resumed.best_fitness == reference.best_fitness
    assert resumed.history == reference.history


def test_bad_arguments_name_the_fix():
    with pytest.raises(LayerpruneError, match="--p-max 0.95 or more"):
        search(L, 0.95, W, batch, key, progress=False)
    with pytest.raises(LayerpruneError, match="--operators 'genetic': use classic or llm"):
        search(L, BETA, W, batch, key, operators="genetic", progress=False)
    with pytest.raises(LayerpruneError, match="--llm-url and --llm-model"):
        search(L, BETA, W, batch, key, operators="llm", progress=False)
    with pytest.raises(LayerpruneError, match="one weight per block"):
        search(L, BETA, W[:3], batch, key, progress=False)
    with pytest.raises(LayerpruneError, match="--population 0 must be an integer >= 1"):
        search(L, BETA, W, batch, key, population=0, progress=False)


# ------------------------------------------------------------------------------------- LLM operators


W4 = [1, 2, 2, 1]
V1 = [0.2, 0.4, 0.5, 0.4]  # feasible: weighted mean 0.4
V2 = [0.1, 0.5, 0.45, 0.4]  # feasible
key4 = lambda r: ",".join(f"{x:.6f}" for x in r)  # noqa: E731


def config(url):
    return LLMConfig(
        url=url,
        model="scripted-model",
        key_env="LAYERPRUNE_TEST_KEY",
        temperature=0.3,
        timeout=5,
        max_retries=0,
    )


def test_llm_operators_use_valid_proposals_and_repair_or_replace_the_rest(tmp_path):
    script = [
        # initial population: 6 proposals asked (uniform is the 7th member)
        json.dumps(
            {
                "children": [
                    V1,  # valid: used as is
                    V1,  # duplicate of the first: replaced
                    [0.3, 0.4, 0.5],  # wrong length: replaced
                    [1.2, 0.4, 0.1, 0.3],  # out of range: clipped and rescaled, used
                    ["a", 0.4, 0.4, 0.4],  # not numbers: replaced
                    [0.5, 0.6, 0.5, 0.4],  # mean 0.517, not 0.4: rescaled, used
                ]
            }
        ),
        '{"parents": [[0, 1], [2',  # parent selection: malformed JSON, tournament instead
        "```json\n"
        + json.dumps({"children": [V2, [0.1, 0.2]]})
        + "\n```",  # crossover: V2 used, one replaced
        500,  # mutation: the request fails, both mutants by the classic operator
    ]
    evaluated = []

    def evaluate(rs):
        evaluated.extend(rs)
        return [sum(a * (r - 0.4) ** 2 for a, r in zip([5, 1, 1, 5], x)) + 1 for x in rs]

    log = tmp_path / "llm.jsonl"
    with ScriptedServer(script) as server:
        result = search(
            4, 0.4, W4, evaluate, key4, population=7, crossovers=2, mutations=2, iterations=1,
            operators="llm", llm=config(server.url), log_path=log, progress=False,
        )  # fmt: skip
    assert len(server.requests) == 4 and not server.script
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["body"]["model"] == "scripted-model" and first["body"]["temperature"] == 0.3
    prompt = first["body"]["messages"][-1]["content"]
    assert "L = 4" in prompt and "0.4" in prompt and "LOWER fitness is better" in prompt
    assert "fitness" in server.requests[1]["body"]["messages"][-1]["content"]  # the population shown

    stats = result.stats
    expected = {
        "requests": 4,
        "request_failed": 1,
        "invalid_json": 1,
        "wrong_length": 2,
        "not_numbers": 1,
        "out_of_range_repaired": 1,
        "mean_repaired": 1,
        "duplicate_replaced": 1,
        "llm_children": 4,  # V1, the two repaired ones, V2
        "classic_fallback": 3 + 1 + 2,
        "wrong_count": 0,
        "wrong_shape": 0,
        "invalid_parents": 0,
    }
    assert {k: stats[k] for k in expected} == expected
    assert result.evaluations == len(evaluated) == 7 + 4
    assert len({key4(r) for r in evaluated}) == 11

    assert V1 in evaluated and V2 in [[round(x, 12) for x in r] for r in evaluated]
    repaired = [r for r in evaluated if r[0] == 0.9]
    assert len(repaired) == 1 and weighted_mean(repaired[0], W4) == pytest.approx(0.4, abs=1e-9)
    for r in evaluated:
        assert weighted_mean(r, W4) == pytest.approx(0.4, abs=1e-9) and all(0 <= x <= 0.9 for x in r)

    lines = [json.loads(s) for s in log.read_text().splitlines()]
    gen0, gen1 = lines[1], lines[2]
    assert [c["operator"] for c in gen0["children"]] == ["uniform"] + ["llm:init"] + ["random"] * 2 + [
        "llm:init",
        "random",
        "llm:init",
    ]
    assert [c.get("fallback") for c in gen0["children"]][1:4] == [None, "duplicate", "wrong_length"]
    ops1 = [(c["operator"], c.get("fallback")) for c in gen1["children"]]
    assert ops1[0] == ("llm:crossover", None) and ops1[1][1] == "wrong_length"
    assert ops1[1][0].startswith("crossover:") and ops1[2:] == [("mutation", "request_failed")] * 2
    assert gen1["stats"]["request_failed"] == 1 and gen0["stats"]["duplicate_replaced"] == 1
    assert gen1["llm_replies"][0]["purpose"] == "select" and "error" in gen1["llm_replies"][-1]


def test_an_unreachable_llm_endpoint_is_a_clear_error():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        LayerpruneError,
        match=r"unreachable.*check --llm-url or use the classic operators \(--operators classic\)",
    ):
        search(
            4, 0.4, W4, lambda rs: [1.0] * len(rs), key4, population=5, iterations=1,
            operators="llm", llm=config(f"http://127.0.0.1:{port}/v1"), progress=False,
        )  # fmt: skip


def test_llm_replies_wrong_in_shape_or_count_are_counted():
    script = [
        json.dumps({"children": [V1, "not a list"]}),  # 3 asked: wrong count, one wrong shape
        json.dumps({"parents": [[0, 1], [0, 99]], "mutants": [1, -1]}),  # two bad indices
        json.dumps({"kids": []}),  # crossover: not the object asked for
        json.dumps({"children": [V2, V2]}),  # mutation: the second duplicates the first
    ]
    with ScriptedServer(script) as server:
        result = search(
            4, 0.4, W4, lambda rs: [float(sum(r)) for r in rs], key4, population=4, crossovers=2,
            mutations=2, iterations=1, operators="llm", llm=config(server.url), progress=False,
        )  # fmt: skip
    s = result.stats
    assert (s["wrong_count"], s["wrong_shape"], s["invalid_parents"], s["invalid_json"]) == (1, 1, 2, 1)
    assert s["duplicate_replaced"] == 1 and s["llm_children"] == 2 and s["request_failed"] == 0
    assert result.evaluations == 4 + 4
