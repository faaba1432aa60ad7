"""The docs site's generated parts, read from the code, the tests and bench/results at build time.

- cli_reference: every subcommand and option of `layerprune.cli.build_parser()`;
- troubleshooting: the reliability sweep's cases (tests/test_reliability.py), grouped by stage;
- benchmarks: the benches' own `--markdown` renderers over bench/results/*.json, and their charts;
- headline: the README's one results table (`python -m docgen.headline --write` refreshes it);
- blocks: the code blocks of README.md and docs/ marked runnable (tests/test_docs.py runs them);
- hooks: the mkdocs hooks that put all of the above into the pages (mkdocs.yml `hooks:`).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
