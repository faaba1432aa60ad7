"""Kill matrix: SIGINT, SIGTERM and SIGKILL sent to the `layerprune` command in the middle of its work,
then the same command run again. Per case: the exit code and stderr of the killed run, what it left on
disk (temporaries, resumable state), and what the rerun did (exit code, whether the killed run's
temporaries are gone, whether its state was resumed), with the inputs hashed before and after.

    python bench/kill_matrix.py [-o bench/results/kill_matrix.json] [--only apply-memory,shapley]
    python bench/kill_matrix.py --markdown [bench/results/kill_matrix.json]

Commands, on the bundled fixture (a copy of it: the input must come out byte-identical):
- apply-memory      a depth plan, killed while the checkpoint is being written (its hidden temporary)
- apply-offload     a Wanda plan with --offload disk, killed once activations are in $TMPDIR
- apply-max-memory  a Wanda plan with --max-memory 15MB, killed once a changed block is in $TMPDIR
- export            `export --gguf` of SmolLM2-135M (the fixture's tokenizer is not convertible, issue
                    32 item 7), killed while llama.cpp's converter writes
- level-db          `plan --allocation search` (Wanda), killed after 3 blocks of its level database
- recover           LoRA, killed after its first checkpoint (--save-every 5)
- shapley           `score --method shapley --store`, killed after 5 stored evaluations

Every run gets its own $TMPDIR and $LAYERPRUNE_CACHE (the level database's cache is kept between the
three signals, its `levels/` emptied), so what a run leaves is seen alone. The signal goes to the
command's process only (as `timeout` sends it); after a SIGKILL, what the command had started (the
GGUF converter) is killed too before the rerun. Bounded: each run has a time limit (--limit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
TEMPORARY = re.compile(r"(^\..*\.(tmp|old)$)|(^layerprune-(acts|blocks)-)|(\.part$)")


@dataclass
class Case:
    argv: list[str]
    ready: object  # (work: Path) -> bool: the moment to send the signal
    resumed: object = None  # (work, stdout, snapshot) -> str | None: what the rerun took over
    snapshot: object = None  # (work: Path) -> object: taken after the kill, handed to `resumed`
    output: str = "out"
    cache: str | None = None  # a cache folder shared by the signals of this command


def _stored(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM evals").fetchone()[0]
    except sqlite3.Error:
        return 0


def _hidden(work: Path, prefix: str) -> list[Path]:
    return [p for p in work.glob(f"{prefix}*") if p.name.endswith(".tmp")]


def _files_in(folders) -> int:
    return sum(1 for d in folders if d.is_dir() for f in d.iterdir() if f.is_file())


def cases(inputs: Path, smol: Path | None) -> dict[str, Case]:
    fx, quick = str(inputs / "fx"), ["--calib", "fixture:val"]
    c = {
        "apply-memory": Case(
            ["apply", str(inputs / "depth.json"), "--model", fx, "-o", "out"],
            lambda w: bool(_hidden(w, ".out.")),
        ),
        "apply-offload": Case(
            ["apply", str(inputs / "wanda.json"), "--model", fx, "-o", "out", "--offload", "disk"],
            lambda w: _files_in((w / "tmp").glob("layerprune-acts-*")) > 0,
        ),
        "apply-max-memory": Case(
            ["apply", str(inputs / "wanda.json"), "--model", fx, "-o", "out", "--max-memory", "15MB"],
            lambda w: _files_in((w / "tmp").glob("layerprune-blocks-*")) > 0,
        ),
        "level-db": Case(
            [
                "plan",
                fx,
                "--sparsity",
                "0.5",
                "--pruner",
                "wanda",
                "--allocation",
                "search",
                "--max-levels",
                "2",
                "--generations",
                "1",
                "--offspring",
                "4",
                "--samples",
                "8",
                "--seqlen",
                "64",
                *quick,
                "-o",
                "plan.json",
                "--no-plot",
            ],  # fmt: skip
            lambda w: len(list((w / "cache" / "levels").glob(".*.tmp/block-*.safetensors"))) >= 3,
            lambda w, out, killed: _blocks_taken_over(w, killed),
            output="plan.json",
            cache="level-db",
            snapshot=_block_inodes,
        ),
        "recover": Case(
            [
                "recover",
                str(inputs / "pruned"),
                "--data",
                "fixture:train",
                "--steps",
                "30",
                "--save-every",
                "5",
                "--seqlen",
                "64",
                "--batch-size",
                "2",
                "--eval-windows",
                "2",
                "-o",
                "out",
                "--no-plot",
            ],  # fmt: skip
            lambda w: any((w / ".out.recover").glob("*")),
            lambda w, out, _: _recovered_from(w / "out"),
        ),
        "shapley": Case(
            [
                "score",
                fx,
                "--method",
                "shapley",
                "--budget",
                "40",
                "--strata",
                "11,10,9,8",
                "--epochs",
                "30",
                "--samples",
                "8",
                "--seqlen",
                "64",
                *quick,
                "--store",
                "s.sqlite",
                "-o",
                "scores.json",
                "--no-plot",
            ],  # fmt: skip
            lambda w: _stored(w / "s.sqlite") >= 5,
            lambda w, out, _: _shapley_resume(w / "scores.json"),
            output="scores.json",
        ),
    }
    if smol is not None:
        c["export"] = Case(
            ["export", str(smol), "--gguf", "out.gguf", "--outtype", "f16"],
            lambda w: any(p.stat().st_size > 0 for p in _hidden(w, ".out.gguf.")),
            output="out.gguf",
        )
    order = ["apply-memory", "apply-offload", "apply-max-memory", "export", "level-db", "recover", "shapley"]
    return {k: c[k] for k in order if k in c}


def _block_inodes(work: Path) -> set[int]:
    """The killed build's block files, by inode and time: a build that takes them over renames their folder."""
    return {_identity(f) for f in (work / "cache" / "levels").glob(".*.tmp/block-*.safetensors")}


def _identity(f: Path) -> tuple[int, int]:
    st = f.stat()
    return st.st_ino, st.st_mtime_ns


def _blocks_taken_over(work: Path, killed: set[int]) -> str | None:
    built = list((work / "cache" / "levels").glob("[!.]*/block-*.safetensors"))
    kept = sum(_identity(f) in killed for f in built)
    return f"{kept} of {len(built)} blocks taken over" if kept else None


def _recovered_from(out: Path) -> str | None:
    try:
        step = json.loads((out / "report.json").read_text())["recovery"]["resumed_from_step"]
    except (OSError, KeyError, ValueError):
        return None
    return f"resumed from step {step}" if step else None


def _shapley_resume(path: Path) -> str | None:
    try:
        extra = json.loads(path.read_text())["extra"]
    except (OSError, KeyError, ValueError):
        return None
    kept = extra["evaluations"] - extra["evaluations_this_run"]
    return f"{kept} of {extra['evaluations']} evaluations from the store" if kept else None


# ---- inputs -------------------------------------------------------------------------------------
def make_inputs(folder: Path) -> Path | None:
    """A copy of the fixture, a depth plan, a Wanda plan and a depth-pruned model; SmolLM2's folder
    for the GGUF export (None where it or llama.cpp's converter is missing)."""
    import layerprune as lp
    from layerprune.errors import LayerpruneError
    from layerprune.models.llamacpp import find_converter
    from layerprune.models.loading import FIXTURE_DIR, resolve

    shutil.copytree(FIXTURE_DIR, folder / "fx", ignore=shutil.ignore_patterns("data", "tasks"))
    lm = lp.load(str(folder / "fx"), device="cpu", quiet=True)
    bi = lp.score(lm, "bi", lp.calibration(lm, "fixture:val", samples=4, seqlen=32), progress=False)
    depth = lp.plan(lm, bi, remove=2)
    depth.save(folder / "depth.json")
    calib = lp.calibration(lm, "fixture:val", samples=8, seqlen=64, kind="sparsity")
    lp.plan(lm, sparsity=0.5, pruner="wanda", calib=calib, progress=False).save(folder / "wanda.json")
    lp.apply(lm, depth)
    lp.export(lm, folder / "pruned", depth)
    try:
        find_converter()
        return resolve("smollm2", quiet=True)[1]
    except LayerpruneError as e:
        print(f"export skipped: {e}", file=sys.stderr)
        return None


def digest(folders) -> str:
    h = hashlib.sha256()
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(folder)).encode())
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


# ---- one case -----------------------------------------------------------------------------------
def listing(work: Path, output: str) -> list[str]:
    """What is on disk in the run's folder, its $TMPDIR and its cache, the output itself aside."""
    found = []
    for p in sorted(work.iterdir()):
        if p.name in ("tmp", "cache", output):
            continue
        found.append(_describe(p, p.name))
    for sub in ("tmp", "cache/levels"):
        for p in sorted((work / sub).glob("*")) if (work / sub).is_dir() else []:
            found.append(_describe(p, f"{sub}/{p.name}"))
    return found


def _describe(p: Path, name: str) -> str:
    if p.suffix == ".sqlite":
        return f"{name} ({_stored(p)} evaluations)"
    if p.is_dir():
        n = sum(1 for f in p.rglob("*") if f.is_file())
        return f"{name}/ ({n} files)"
    return name


def _key(entry: str) -> str:
    """`tmp/layerprune-acts-1-h.x/ (3 files)` -> `tmp/layerprune-acts-1-h.x`"""
    return entry.split(" ")[0].rstrip("/")


def temporaries(entries: list[str]) -> list[str]:
    return [e for e in entries if TEMPORARY.search(_key(e).split("/")[-1])]


def _start(argv, work: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "layerprune", *argv, "--quiet"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: what it started can be found and ended
    )


def _stderr_summary(text: str) -> dict:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    said = {"lines": len(lines), "last": lines[-1] if lines else "", "traceback": "Traceback" in text}
    if said["traceback"]:
        said["text"] = lines[-60:]
    return said


def run_case(name: str, case: Case, sig: str, root: Path, limit: float) -> dict:
    work = root / f"{name}-{sig}"
    cache = root / f"cache-{case.cache}" if case.cache else work / "cache"
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "LAYERPRUNE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    row: dict = {"command": name, "signal": sig, "argv": ["layerprune", *case.argv]}
    attempts = 0
    while attempts < 3:  # a command can finish between two polls: start again
        attempts += 1
        shutil.rmtree(work, ignore_errors=True)
        (work / "tmp").mkdir(parents=True)
        shutil.rmtree(cache / "levels", ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        if case.cache:
            (work / "cache").symlink_to(cache)
        proc = _start(case.argv, work, env)
        t0, ready = time.time(), False
        while time.time() - t0 < limit and proc.poll() is None:
            if case.ready(work):
                ready = True
                break
            time.sleep(0.01)
        if ready and proc.poll() is None:
            os.kill(proc.pid, SIGNALS[sig])
            row["signal_after_s"] = round(time.time() - t0, 1)
        elif proc.poll() is None:
            proc.kill()
        try:
            _, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        with_group = _end_group(proc.pid)
        if not (ready and proc.returncode == 0):
            break
    row["attempts"] = attempts
    row["killed"] = {
        "exit": proc.returncode,
        "stderr": _stderr_summary(err),
        "left": listing(work, case.output),
        "output_exists": (work / case.output).exists(),
        "children_left_running": with_group,
    }
    row["killed"]["temporaries"] = temporaries(row["killed"]["left"])
    snapshot = case.snapshot(work) if case.snapshot else None
    t0 = time.time()
    rerun = _start(case.argv, work, env)
    try:
        out, err = rerun.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        rerun.kill()
        out, err = rerun.communicate()
    _end_group(rerun.pid)
    left = listing(work, case.output)
    row["rerun"] = {
        "exit": rerun.returncode,
        "seconds": round(time.time() - t0, 1),
        "stderr": _stderr_summary(err) if rerun.returncode else None,
        "output_exists": (work / case.output).exists(),
        "left": left,
        "temporaries": temporaries(left),
        "stale_removed": not {_key(t) for t in row["killed"]["temporaries"]}
        & {_key(t) for t in temporaries(left)},
        "resumed": case.resumed(work, out, snapshot) if case.resumed else None,
    }
    shutil.rmtree(work, ignore_errors=True)  # the GGUF and checkpoints are large
    return row


def _end_group(pid: int) -> bool:
    """Kill what the command started and left running (a converter orphaned by SIGKILL); whether any was."""
    try:
        os.killpg(pid, 0)
    except OSError:
        return False
    os.killpg(pid, signal.SIGKILL)
    return True


# ---- the table ----------------------------------------------------------------------------------
def _exit(code: int | None) -> str:
    if code is None:
        return "-"
    return f"killed ({-code})" if code < 0 else str(code)


def markdown(doc: dict) -> str:
    rows = [
        "| command | signal | exit | stderr | left on disk | rerun exit | killed run's temporaries removed | rerun resumed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        k, again = r["killed"], r["rerun"]
        said = k["stderr"]["last"] if k["stderr"]["lines"] == 1 else f"{k['stderr']['lines']} lines"
        said = "(nothing)" if k["stderr"]["lines"] == 0 else said
        said += " (traceback)" if k["stderr"]["traceback"] else ""
        left = ", ".join(f"`{e}`" for e in k["left"]) or "nothing"
        gone = "-" if not k["temporaries"] else ("yes" if again["stale_removed"] else "**no**")
        rows.append(
            f"| {r['command']} | {r['signal']} | {_exit(k['exit'])} | {said} | {left} | {_exit(again['exit'])}"
            f"{'' if again['output_exists'] else ' (no output)'} | {gone} | {again['resumed'] or '-'} |"
        )
    same = "unchanged" if doc["inputs_before"] == doc["inputs_after"] else "**CHANGED**"
    rows.append("")
    rows.append(
        f"Inputs (fixture copy, plans, pruned model): sha256 {doc['inputs_before']} before, {same} after."
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "-o", "--output", type=Path, default=Path(__file__).parent / "results" / "kill_matrix.json"
    )
    ap.add_argument("--markdown", nargs="?", const="", default=None, metavar="JSON", help="print the table")
    ap.add_argument("--only", default=None, help="commands to run, comma-separated")
    ap.add_argument("--signals", default="SIGINT,SIGTERM,SIGKILL")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds each run may take")
    args = ap.parse_args()
    if args.markdown is not None:
        print(markdown(json.loads(Path(args.markdown or args.output).read_text())))
        return
    root = Path(tempfile.mkdtemp(prefix="layerprune-kill-matrix."))
    try:
        inputs = root / "inputs"
        inputs.mkdir()
        smol = make_inputs(inputs)
        watched = [inputs] + ([smol] if smol else [])
        before = digest(watched)
        table = cases(inputs, smol)
        wanted = args.only.split(",") if args.only else list(table)
        rows = []
        for name in wanted:
            for sig in args.signals.split(","):
                t0 = time.time()
                rows.append(run_case(name, table[name], sig, root, args.limit))
                r = rows[-1]
                print(
                    f"{name} {sig}: exit {_exit(r['killed']['exit'])}, left {r['killed']['left']}; rerun "
                    f"{_exit(r['rerun']['exit'])}, left {r['rerun']['left']}, resumed {r['rerun']['resumed']} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
        doc = {"rows": rows, "inputs_before": before, "inputs_after": digest(watched)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from _results import write

    write(doc, args.output)
    print(markdown(doc))


if __name__ == "__main__":
    main()
