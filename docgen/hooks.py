"""mkdocs hooks (mkdocs.yml `hooks:`): the generated parts of the pages, made when the site is built.

A page asks for one with an HTML comment, which stays invisible where the Markdown is read as is:

    <!-- generated: cli-reference -->      every subcommand and option (docgen.cli_reference)
    <!-- generated: troubleshooting -->    the reliability sweep's cases (docgen.troubleshooting)
    <!-- generated: api-reference -->      mkdocstrings entries for the public names of `layerprune`
    <!-- generated: bench NAME -->         `python bench/NAME.py --markdown` (docgen.benchmarks)
    <!-- generated: bench NAME#HEADER -->  the one table of it whose first header cell starts with HEADER
    <!-- generated: cost-table -->         every stage's measured cost (real.json `cost`)
    <!-- generated: headline -->           the README's results table (docgen.headline)
    <!-- generated: cost KEY -->           one stage's measured cost, inline

and the charts the benches wrote are added to the site as files (docgen.benchmarks.CHARTS).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: `docgen` itself

from docgen import ROOT, benchmarks, cli_reference, headline, troubleshooting  # noqa: E402

MARKER = re.compile(r"<!-- generated: ([\w-]+)(?: ([^>]+?))? -->")


def api_reference() -> str:
    """One mkdocstrings entry per public name of `layerprune` (its lazy map: the verbs in pipeline
    order, then the types), each at the module that defines it."""
    import layerprune

    return "\n\n".join(f"::: {module}.{name}" for name, module in layerprune._LAZY.items())


def _generate(kind: str, arg: str | None) -> str:
    if kind == "bench":
        name, _, header = arg.partition("#")
        return benchmarks.table(name, header) if header else benchmarks.tables(name)
    if kind == "cost":
        return benchmarks.cost(arg)
    makers = {
        "cli-reference": cli_reference.render,
        "troubleshooting": troubleshooting.render,
        "api-reference": api_reference,
        "cost-table": benchmarks.cost_table,
        "headline": headline.render,
    }
    if kind not in makers:
        raise KeyError(f"unknown generated part '{kind}'; use bench, cost, {', '.join(makers)}")
    return makers[kind]()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: _generate(m.group(1), m.group(2)), markdown)


def on_files(files, config):
    from mkdocs.structure.files import File

    for source, dest in benchmarks.CHARTS.items():
        path = benchmarks.RESULTS / source
        if path.exists():
            files.append(File.generated(config, dest, abs_src_path=str(path)))
    return files


__all__ = ["ROOT", "on_files", "on_page_markdown"]
