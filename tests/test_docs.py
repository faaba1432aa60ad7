"""The documentation cannot drift from the code.

- Every code block of README.md and docs/ marked `<!-- run -->` runs here, on the bundled model, in
  the order a reader would run them (docgen/blocks.py): `layerprune ...` lines through the CLI's
  `main` in this process (the console script's parser and exit codes, without a torch import per
  line), other shell lines in a shell, Python blocks with exec.
- Every option of every subcommand has help text, and appears in the generated CLI reference.
- README.md's results table is the one docgen renders from bench/results.
(`make test` also builds the site with `mkdocs build --strict`: no broken link, no missing reference.)
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from docgen import blocks as docblocks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the bundled model: one thread is faster

BLOCKS = docblocks.blocks()
_folders: dict[Path, Path] = {}  # one working folder per page: its blocks build on each other


def _folder(page: Path, factory) -> Path:
    if page not in _folders:
        _folders[page] = factory.mktemp(page.stem)
    return _folders[page]


def _run_shell(command: str, cwd: Path, cli) -> None:
    argv = shlex.split(command, comments=True)
    if argv[0] == "layerprune":
        r = cli(*argv[1:])
        assert r.returncode == 0, f"`{command}` exited {r.returncode}: {r.stderr.strip()[-2000:]}"
        return
    if argv[0] == "python":  # the interpreter of this test run
        command = shlex.join([sys.executable, *argv[1:]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"`{command}` exited {r.returncode}: {r.stderr.strip()[-2000:]}"


def test_there_are_runnable_blocks():
    pages = {b.file.name for b in BLOCKS}
    assert "README.md" in pages and len(BLOCKS) >= 10, [b.id for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block, tmp_path_factory, monkeypatch, cli):
    cwd = _folder(block.file, tmp_path_factory)
    monkeypatch.chdir(cwd)
    if block.lang == "python":
        exec(compile(block.code, block.id, "exec"), {"__name__": "__docs__"})
        return
    assert block.lang in ("sh", "bash", "console"), f"{block.id}: cannot run a ```{block.lang} block"
    for command in docblocks.commands(block.code):
        _run_shell(command, cwd, cli)


def _parser_options() -> list[tuple[str, argparse.Action]]:
    """Every argument of every subcommand, walked from the parser here (not through docgen)."""
    from layerprune.cli import build_parser

    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [
        (name, a)
        for name, p in sub.choices.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction)
    ]


def test_every_cli_option_has_help():
    missing = [
        f"{name} {a.option_strings or a.dest}" for name, a in _parser_options() if not (a.help or "").strip()
    ]
    assert not missing, f"options without help text: {missing}"


def test_every_cli_option_is_in_the_reference():
    from docgen import cli_reference

    text = cli_reference.render()
    sections = {
        name: part for part in text.split("\n## layerprune ")[1:] for name in [part.split("\n", 1)[0]]
    }
    options = _parser_options()
    assert len(options) > 100
    for name, a in options:
        flags = ", ".join(a.option_strings) or a.dest
        assert f"| `{flags}` |" in sections[name], (name, flags)
        assert a.help.replace("%%", "%").split(";")[0][:40].replace("|", "\\|") in sections[name], (
            name,
            flags,
        )


def test_readme_results_table_is_generated():
    from docgen import headline

    assert headline.current() is not None, "README.md lost its headline-table markers"
    assert headline.current() == headline.render(), "run `python -m docgen.headline --write`"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
