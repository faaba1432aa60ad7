"""`layerprune report`: pruned models side by side, read back and compared with the inputs.

Two runs are real (the fixture pruned by two depth plans, evaluated and exported); a sparsity run
with LoRA recovery and a width run are hand-written report.json files, as are the zero-shot and
latency records of the eval results (their producers are not the subject here).
"""

from __future__ import annotations

import copy
import json
import re

import pytest

import layerprune as lp
from layerprune.evaluation.perplexity import perplexity_of_windows
from layerprune.models.loading import FIXTURE_DIR
from layerprune.reports import compare

ZEROSHOT = {
    "tasks": {
        "arc_easy": {
            "acc": 0.41,
            "acc_stderr": 0.049,
            "acc_norm": 0.44,
            "acc_norm_stderr": 0.05,
            "num_choices": 4,
            "chance": 0.25,
            "samples": 100,
            "metric": "acc_norm",
        },
        "piqa": {
            "acc": 0.58,
            "acc_stderr": 0.049,
            "num_choices": 2,
            "chance": 0.5,
            "samples": 100,
            "metric": "acc",
        },
    },
    "mean": 0.51,
}


def _depth_run(out, fixture_lm, windows, remove: list[str]):
    """A copy of the fixture pruned by a depth plan, evaluated, exported: (folder, pruned model)."""
    lm = copy.deepcopy(fixture_lm)
    model = {"name": "fixture", "fingerprint": lm.fingerprint, "architecture": "llama", "num_blocks": 12}
    plan = lp.DepthPlan(model=model, method="bi", remove=remove)
    counts = lp.apply(lm, plan)
    result = perplexity_of_windows(lm.model, lm.adapter, windows, progress=False)
    lp.export(lm, out, plan, {"pruning": counts, "evaluation": [result.to_dict()]})
    return out, lm


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fixture_lm):
    d = tmp_path_factory.mktemp("runs")
    windows = lp.eval_windows(fixture_lm.tokenizer, lp.load_text("fixture:test"), 64, "first", 4)
    dense = perplexity_of_windows(fixture_lm.model, fixture_lm.adapter, windows, progress=False)
    (d / "dense.json").write_text(
        json.dumps(
            {
                "model": "fixture",
                "model_path": str(FIXTURE_DIR),
                "model_fingerprint": fixture_lm.fingerprint,
                "parameters": sum(p.numel() for p in fixture_lm.model.parameters()),
                "perplexity": [dense.to_dict()],
                "zeroshot": ZEROSHOT,
            }
        )
    )
    d2, lm2 = _depth_run(d / "d2", fixture_lm, windows, ["3", "7"])
    short = lp.perplexity(lm2, "fixture:test", seqlen=32, max_windows=4, progress=False)
    (d / "d2_eval.json").write_text(
        json.dumps(
            {
                "model": str(d2),
                "model_path": str(d2.resolve()),
                "model_fingerprint": "pruned-d2",
                "parameters": sum(p.numel() for p in lm2.model.parameters()),
                "perplexity": [short.to_dict()],
                "zeroshot": {**ZEROSHOT, "mean": 0.47},
                "latency": {"prefill_ms": 12.5, "peak_memory_bytes": 100 * 2**20, "device": "cpu"},
            }
        )
    )
    _depth_run(d / "d4", fixture_lm, windows, ["2", "4", "6", "8"])
    # a plan next to the runs: not a report nor eval results, skipped when the folder is scanned
    (d / "plan.json").write_text((d / "d2" / "plan.json").read_text())

    hand = tmp_path_factory.mktemp("hand")
    base = json.loads((d / "d4" / "report.json").read_text())
    result = base["evaluation"][0]
    (hand / "s70").mkdir()
    (hand / "s70" / "report.json").write_text(
        json.dumps(
            {
                "base_model": base["base_model"],
                "plan": {
                    "format": "layerprune.plan/2",
                    "kind": "sparsity",
                    "model": base["base_model"],
                    "method": "alpha",
                    "params": {"target": 0.7},
                    "pruner": "wanda",
                    "layers": {f"{b}.{r}": 0.6 + 0.01 * b for b in range(12) for r in ("q", "up")},
                    "nm": None,
                },
                "pruning": {"pruner": "wanda", "achieved_mean_sparsity": 0.7},
                "evaluation": [{**result, "ppl": 70.0}],  # as `layerprune recover` writes it: after
                "recovery": {
                    "method": "lora",
                    "steps": 10,
                    "perplexity_before": [{**result, "ppl": 95.0}],
                    "perplexity_after": [{**result, "ppl": 70.0}],
                },
            }
        )
    )
    (hand / "cpt").mkdir()  # a dense model retrained: no plan
    (hand / "cpt" / "report.json").write_text(
        json.dumps(
            {
                "base_model": base["base_model"],
                "plan": None,
                "evaluation": [{**result, "ppl": 50.0}],
                "recovery": {"method": "full", "perplexity_after": [{**result, "ppl": 50.0}]},
            }
        )
    )
    (hand / "w30").mkdir()
    other_protocol = {**result, "ppl": 120.0, "protocol": {**result["protocol"], "windows": 8}}
    (hand / "w30" / "report.json").write_text(
        json.dumps(
            {
                "base_model": base["base_model"],
                "plan": {
                    "kind": "width",
                    "model": base["base_model"],
                    "method": "search",
                    "params": {"target": 0.3, "achieved": 0.31, "achieved_rates": [0.31] * 12},
                    "attn": [0.25] * 12,
                    "mlp": [0.33] * 12,
                },
                "pruning": {"parameters_before": 1000, "parameters_after": 750},
                "evaluation": [other_protocol],
            }
        )
    )
    return d, hand


def _table(md: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The Markdown table: its headers, and each row's cells by header, by model label."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]

    def cells(line):
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    heads = cells(lines[0])
    rows = [dict(zip(heads, cells(ln))) for ln in lines[2:]]
    return heads, {r["model"]: r for r in rows}


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def made(runs, tmp_path_factory):
    d, hand = runs
    out = tmp_path_factory.mktemp("out") / "report"
    inputs = [
        d / "d2",
        d / "d4",
        d / "dense.json",
        d / "d2_eval.json",
        hand / "s70",
        hand / "cpt",
        hand / "w30",
    ]
    assert lp.report(inputs, out) == out
    md = (out / "report.md").read_text()
    return out, md, json.loads((out / "report.json").read_text())


def test_the_table_holds_the_numbers_of_the_runs(runs, made):
    d, _ = runs
    out, md, doc = made
    heads, table = _table(md)
    rows = {r["label"]: r for r in doc["rows"]}
    assert [r["label"] for r in doc["rows"]][0] == "fixture"  # the dense model first
    assert list(table) == [r["label"] for r in doc["rows"]]
    for name, blocks in (("d2", "3, 7"), ("d4", "2, 4, 6, 8")):
        rep = json.loads((d / name / "report.json").read_text())
        counts, result = rep["pruning"], rep["evaluation"][0]
        header = next(c["header"] for c in doc["columns"]["perplexity"] if c["protocol"]["seqlen"] == 64)
        assert rows[name]["perplexity"][header]["ppl"] == result["ppl"]
        assert _number(table[name][header]) == pytest.approx(result["ppl"], abs=5e-4)
        assert rows[name]["parameters"] == counts["parameters_after"]
        assert rows[name]["base_parameters"] == counts["parameters_before"]
        assert _number(table[name]["parameters"]) == counts["parameters_after"]
        pct = 100 * counts["parameters_after"] / counts["parameters_before"]
        assert f"({pct:.1f}%)" in table[name]["parameters"]
        assert table[name]["removed"] == blocks
        assert table[name]["kind / method"] == f"depth bi, {len(blocks.split(','))} of 12 blocks"
        assert rows[name]["allocation"] == [float(str(i) in blocks.split(", ")) for i in range(12)]
    dense = json.loads((d / "dense.json").read_text())
    assert rows["fixture"]["parameters"] == dense["parameters"] == rows["d2"]["base_parameters"]
    assert _number(table["fixture"][header]) == pytest.approx(dense["perplexity"][0]["ppl"], abs=5e-4)
    assert set(doc["charts"]) == {"perplexity.png", "allocation.png"}
    assert {p.name for p in out.iterdir()} == {
        "report.md",
        "report.html",
        "report.json",
        "perplexity.png",
        "allocation.png",
    }


def test_eval_results_attach_to_the_row_of_their_model(runs, made):
    d, _ = runs
    _, md, doc = made
    heads, table = _table(md)
    rows = {r["label"]: r for r in doc["rows"]}
    short = json.loads((d / "d2_eval.json").read_text())["perplexity"][0]
    column = next(c["header"] for c in doc["columns"]["perplexity"] if c["protocol"]["seqlen"] == 32)
    assert rows["d2"]["perplexity"][column]["ppl"] == short["ppl"]
    assert _number(table["d2"][column]) == pytest.approx(short["ppl"], abs=5e-4)
    assert table["d4"][column] == table["fixture"][column] == "—"
    # zero-shot: headline metric +- stderr per task, and the mean; latency only where measured
    assert table["fixture"]["arc_easy acc_norm (%)"] == "44.0 ± 5.0"
    assert table["d2"]["piqa acc (%)"] == "58.0 ± 4.9"
    assert table["d2"]["zero-shot mean (%)"] == "47.0" and table["fixture"]["zero-shot mean (%)"] == "51.0"
    assert table["d4"]["piqa acc (%)"] == "—"
    assert table["d2"]["latency prefill_ms"] == "12.5" and table["d4"]["latency prefill_ms"] == "—"
    assert table["d2"]["latency peak_memory_bytes"] == "100.0 MiB"
    assert "latency device" not in heads
    # the dense model's results file, not otherwise listed, makes its own row named by its model
    assert rows["fixture"]["kind"] == "dense" and rows["fixture"]["folder"] == str(FIXTURE_DIR)
    assert len(doc["rows"]) == 6


def test_eval_results_win_over_the_report_and_scanning_a_folder(runs, tmp_path):
    d, _ = runs
    rep = json.loads((d / "d4" / "report.json").read_text())
    remeasured = {**rep["evaluation"][0], "ppl": 1234.5}
    (tmp_path / "d4.json").write_text(
        json.dumps({"model": str(d / "d4"), "model_fingerprint": "x", "perplexity": [remeasured]})
    )
    out = lp.report([d, tmp_path / "d4.json"], tmp_path / "out")
    doc = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in doc["rows"]] == ["fixture", "d2", "d4"]  # d2_eval.json attached
    assert doc["skipped"] == [str(d / "plan.json")]
    rows = {r["label"]: r for r in doc["rows"]}
    (cell,) = [v for v in rows["d4"]["perplexity"].values()]
    assert cell["ppl"] == 1234.5
    assert len(rows["d2"]["perplexity"]) == 2


def test_protocols_recovery_and_the_sparsity_note(made):
    _, md, doc = made
    _, table = _table(md)
    columns = doc["columns"]["perplexity"]
    assert len(columns) == 3  # seqlen 64 / 4 windows, seqlen 32, and w30's 8 windows
    assert len({c["header"] for c in columns}) == 3
    for c in columns:
        keys = {
            (r["perplexity"][c["header"]] and (c["protocol"]["seqlen"], c["protocol"]["windows"]))
            for r in doc["rows"]
            if c["header"] in r["perplexity"]
        }
        assert len(keys) == 1
    w30 = next(c["header"] for c in columns if c["protocol"]["windows"] == 8)
    assert "8 windows" in w30 and table["w30"][w30] == "120.000"
    assert [r["label"] for r in doc["rows"] if w30 in r["perplexity"]] == ["w30"]
    assert (
        table["w30"]["kind / method"] == "width search 30%" and table["w30"]["removed"] == "mean rate 0.310"
    )
    assert table["w30"]["parameters"] == "750 (75.0%)"
    main = next(c["header"] for c in columns if c["protocol"]["seqlen"] == 64 and c["header"] != w30)
    assert table["s70"][main] == "70.000 (before 95.000)"
    assert table["s70"]["kind / method"] == "sparsity wanda alpha 70% +LoRA"
    assert table["s70"]["removed"] == "mean sparsity 0.700"
    assert table["cpt"]["kind / method"] == "dense +CPT" and table["cpt"][main] == "50.000"
    s70 = next(r for r in doc["rows"] if r["label"] == "s70")
    assert s70["allocation"] == pytest.approx([0.6 + 0.01 * b for b in range(12)])
    assert "stores its zeros densely" in md


def test_html_is_self_contained(made):
    out, _, _ = made
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<style>" in page and "d2" in page


def test_without_matplotlib_tables_only(runs, tmp_path, monkeypatch):
    d, _ = runs
    monkeypatch.setattr(compare, "pyplot", lambda: None)
    out = lp.report([d / "d4"], tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "report.json"}
    assert "matplotlib is not installed" in (out / "report.md").read_text()
    assert "<img" not in (out / "report.html").read_text()


def test_cli_writes_and_overwrites(runs, tmp_path, cli):
    d, _ = runs
    (tmp_path / "empty").mkdir()
    r = cli("report", d / "d4", "-o", tmp_path / "empty", "--title", "Two | runs")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote ") and "report.html" in r.stdout
    assert (tmp_path / "empty" / "report.md").read_text().startswith("# Two | runs")
    r = cli("report", d / "d2", "-o", tmp_path / "empty", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "| d2 |" in (tmp_path / "empty" / "report.md").read_text()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


@pytest.mark.parametrize(
    "args, fix",
    [
        (["missing"], "does not exist"),
        (["empty_dir"], "neither report.json"),
        (["plan.json"], "neither a layerprune report.json nor eval results"),
        (["corrupt.json"], "not valid JSON"),
        ([], "nothing to report on"),
        (["d2", "-o", "d2/report"], "inside the input"),
        (["d2", "-o", "existing"], "pass --overwrite"),
    ],
)
def test_bad_input_is_one_line(args, fix, runs, tmp_path, cli, monkeypatch):
    d, _ = runs
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("x")
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "plan.json").write_text((d / "plan.json").read_text())
    (tmp_path / "d2").symlink_to(d / "d2")
    if "-o" not in args:
        args = [*args, "-o", "out"]
    r = cli("report", *args)
    assert r.returncode == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerprune: error:") and fix in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and not (d / "d2" / "report").exists()
    assert (tmp_path / "existing" / "keep.txt").exists()
