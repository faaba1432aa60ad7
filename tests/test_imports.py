"""The import contracts (pyproject.toml, run by `make test` as `lint-imports`) hold, and they catch
the drift they exist for: a function-local import reaching up the pipeline fails them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[dev])")


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [LINT, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_tree_keeps_every_contract(tmp_path):
    r = lint(ROOT / "src", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_function_local_import_reaching_up_breaks_the_layers(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "layerprune", src / "layerprune", ignore=shutil.ignore_patterns("fixture"))
    tiny = src / "layerprune" / "models" / "tiny.py"
    tiny.write_text(
        tiny.read_text()
        + "\n\ndef drift():\n    from ..pruners.width import apply_plan\n\n    return apply_plan\n"
    )
    r = lint(src, tmp_path)
    assert r.returncode != 0
    assert "layerprune.models.tiny -> layerprune.pruners.width" in r.stdout
    broken = [line for line in r.stdout.splitlines() if line.endswith("BROKEN")]
    assert any("lower module never reaches up" in line for line in broken), r.stdout


def test_plans_import_without_torch():
    code = "import sys, layerprune.plans as p; p.Plan; print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_the_cli_parser_builds_without_torch():
    # every subcommand's options, choices included, come from modules that do not need torch
    code = (
        "import sys; from layerprune.cli import build_parser; "
        "build_parser().format_help(); print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
