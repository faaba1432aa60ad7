"""Benchmark tables, rendered by the benches' own `--markdown` renderers from bench/results/*.json.

Each renderer runs in this process as `python bench/NAME.py --markdown` would (its `main` under
`__main__`, its stdout captured), so the site shows exactly what the bench prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from functools import cache

from . import ROOT

BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# the benches with a --markdown renderer
RENDERERS = ("real", "search", "peers", "serve", "recover", "frontier")
CHARTS = {  # charts the benches write beside their results, as the site names them
    "real_report/perplexity.png": "benchmarks/charts/real-perplexity.png",
    "real_report/allocation.png": "benchmarks/charts/real-allocation.png",
    "recover_report/perplexity.png": "benchmarks/charts/recover-perplexity.png",
    "recover_report/allocation.png": "benchmarks/charts/recover-allocation.png",
    "frontier_bytes.png": "benchmarks/charts/frontier-bytes.png",
    "frontier_speed.png": "benchmarks/charts/frontier-speed.png",
}


@cache
def tables(name: str) -> str:
    """`python bench/NAME.py --markdown`'s output."""
    if name not in RENDERERS:
        raise KeyError(f"bench/{name}.py has no --markdown renderer; use one of {', '.join(RENDERERS)}")
    argv, path = sys.argv, list(sys.path)
    out = io.StringIO()
    try:
        sys.argv = [str(BENCH / f"{name}.py"), "--markdown"]
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_path(str(BENCH / f"{name}.py"), run_name="__main__")
            except SystemExit as e:
                if e.code:
                    raise RuntimeError(f"bench/{name}.py --markdown exited {e.code}") from None
    finally:
        sys.argv, sys.path[:] = argv, path
    return out.getvalue().strip()


def table(name: str, header: str) -> str:
    """The one table of `tables(name)` whose first header cell starts with `header`."""
    for part in tables(name).split("\n\n"):
        if part.startswith(f"| {header}"):
            return part.strip()
    raise KeyError(f"bench/{name}.py --markdown prints no table headed '{header}'")


@cache
def results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def cost(key: str) -> str:
    """One stage's measured cost on SmolLM2 (real.json `cost`): wall time in dense forwards over the
    stage's own windows, and the estimate it is checked against."""
    row = results("real")["cost"].get(key)
    if row is None:
        raise KeyError(f"real.json has no cost row '{key}'; use one of {', '.join(results('real')['cost'])}")
    estimate = row.get("estimate")
    return f"{row['forwards']:.1f} measured on SmolLM2" + (f" (estimate {estimate:g})" if estimate else "")


def cost_table() -> str:
    """Every stage's measured cost on SmolLM2, from real.json `cost`."""
    out = [
        "| stage | seconds | one dense forward, s | cost in dense forwards | estimate | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in results("real")["cost"].items():
        ratio = "–" if row.get("ratio") is None else f"{row['ratio']:.2f}"
        out.append(
            f"| {key} | {row['seconds']:.0f} | {row['unit_seconds']:.1f} | {row['forwards']:.2f} | "
            f"{row.get('estimate', '–')} | {ratio} |"
        )
    return "\n".join(out)
