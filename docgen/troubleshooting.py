"""Troubleshooting: every class of one-line error a user can cause, from the reliability sweep itself.

tests/test_reliability.py holds the cases as data: `CASES`, a list of (arguments, a fragment of the
one error line that names the fix), grouped by stage under `# comment` lines; and a test per fault
(a kill, two runs on one store). This reads both when the site is built, so a case added to the sweep
appears here and a case changed there changes here.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import shlex
import sys
import tokenize

from . import ROOT

SWEEP = ROOT / "tests" / "test_reliability.py"


def _module():
    spec = importlib.util.spec_from_file_location("_reliability_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SWEEP.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SWEEP.parent))
    return module


def _groups(source: str) -> list[str]:
    """The stage of each element of CASES: the last comment line above it inside the list."""
    tree = ast.parse(source)
    node = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "CASES" for t in n.targets)
    )
    comments = [
        (tok.start[0], tok.string.lstrip("# ").strip())
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
        and tok.line.strip().startswith("#")
        and node.lineno <= tok.start[0] <= node.end_lineno
    ]
    out = []
    for element in node.elts:
        above = [text for line, text in comments if line < element.lineno]
        out.append(above[-1] if above else "other")
    return out


def cases() -> list[tuple[str, list[str], str]]:
    """(stage, arguments as a user would type them, the fix fragment) for every case of the sweep."""
    module = _module()
    stages = _groups(SWEEP.read_text())
    if len(stages) != len(module.CASES):
        raise RuntimeError("tests/test_reliability.py: CASES is not one literal list; docgen cannot group it")
    fixture = str(module.FIXTURE_DIR)
    out = []
    for stage, (args, fix) in zip(stages, module.CASES):
        shown = [
            a.replace(fixture, "fixture-folder").replace("{d}/", "").replace("{out}", "out.json")
            for a in args
        ]
        out.append((stage, shown, fix))
    return out


def faults() -> list[tuple[str, str]]:
    """(what the test checks, its docstring) for every test of the sweep other than the case table."""
    tree = ast.parse(SWEEP.read_text())
    out = []
    for n in tree.body:
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_") and "naming_the_fix" not in n.name:
            doc = " ".join((ast.get_docstring(n) or "").split())
            if n.name != "test_the_sweep_is_large_enough":
                out.append((n.name.removeprefix("test_").replace("_", " "), doc))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    rows = cases()
    out = [
        f"Every error a user can cause is **one line** on stderr, `layerprune: error: …`, that names the fix, "
        "with exit code 2; no traceback, and nothing is left half-written. The "
        f"{len(rows)} cases below are the reliability sweep's (`tests/test_reliability.py`), run by every "
        "`make test`; this page is generated from them. The left column is the part of the line that the "
        "sweep checks.",
        "",
    ]
    stages: dict[str, list] = {}
    for stage, args, fix in rows:
        stages.setdefault(stage, []).append((args, fix))
    for stage, members in stages.items():
        out += [
            f"## {stage[0].upper()}{stage[1:]}",
            "",
            "| the error line says | when you ran |",
            "|---|---|",
        ]
        for args, fix in members:
            command = shlex.join(["layerprune", *args])
            out.append(f"| … {_cell(fix)} … | `{_cell(command)}` |")
        out.append("")
    found = faults()
    if found:
        out += ["## Faults: kills, shared stores, reruns", "", "| what is checked | how |", "|---|---|"]
        out += [f"| {_cell(name)} | {_cell(doc)} |" for name, doc in found]
        out.append("")
    return "\n".join(out)
