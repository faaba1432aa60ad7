"""Pruned models side by side: `layerprune report RUN... -o report/`.

Each RUN is one of:

- a model folder exported by `layerprune apply` / `layerprune.export` (it holds report.json), or any
  Hugging Face model folder (config.json, no report.json: a dense model, no plan);
- a report.json file (read as the folder it sits in);
- an eval results file written by `layerprune eval MODEL ... -o results.json` ("model" and
  "perplexity" and/or "zeroshot"). It attaches to the row of the model it names: the listed folder
  equal to its "model_path" (or to its "model" argument when that is 'fixture' or a local folder),
  else the row with its "model_fingerprint". A model not otherwise listed gets its own row, labelled
  by its "model" (its folder is read too when it is a model folder);
- a folder holding several of those (a demo output folder, say): its model sub-folders and its *.json
  eval results, one level deep; other JSON files there (plans, scores) are skipped.

Written atomically into OUT: report.md, report.html (self-contained: inline CSS, charts as data
URIs), report.json (the table as numbers) and, with matplotlib, perplexity.png (perplexity against the
fraction of parameters removed) and allocation.png (what each plan removes per block).

Only JSON and the headers of *.safetensors files are read: no model is loaded, no torch imported.
Perplexities share a column only when their protocols agree (text, seqlen, BOS, windows, mask).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import LayerpruneError
from ..io import atomic_dir, check_destination
from ..plotting import pyplot
from .collect import ACCEPTS, _attach, _collect
from .render import _charts, _notes, _table, _write
from .table import _columns, _rows


def _check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> bool:
    """Refuse an output inside an input (or an input inside the output); returns whether `out` may
    be replaced (--overwrite, or an empty folder)."""
    check_destination(out, list(inputs))
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output {out} is a file; give -o a folder to write the report into")
    empty = out.is_dir() and not any(out.iterdir())
    if out.exists() and not empty and not overwrite:
        raise LayerpruneError(f"output folder {out} already exists; choose another -o or pass --overwrite")
    return overwrite or empty


# ---- the verb ---------------------------------------------------------------------------------
def report(paths, out: str | Path, overwrite: bool = False, *, title: str | None = None) -> Path:
    """Compare pruned models side by side: write report.md, report.html, report.json and charts to
    `out` (a folder, written atomically). `paths`: model folders, report.json files, eval results
    files of `layerprune eval -o`, or folders holding them (see the module docstring)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p).expanduser() for p in paths or []]
    if not paths:
        raise LayerpruneError(f"nothing to report on; {ACCEPTS}")
    out = Path(out).expanduser()
    title = title or "layerprune report"
    runs, evals, skipped = _collect(paths)
    runs = _attach(runs, evals)
    replace = _check_output(out, [*paths, *(r.folder for r in runs if r.folder)], overwrite)

    rows = _rows(runs)
    columns = _columns(rows)
    heads, body = _table(rows, columns)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with atomic_dir(out, overwrite=replace) as tmp:
        plt = pyplot()
        charts = _charts(plt, rows, columns, tmp)
        notes = _notes(rows, columns, True if plt is not None else None)
        _write(
            tmp,
            title=title,
            when=when,
            paths=paths,
            skipped=skipped,
            rows=rows,
            columns=columns,
            heads=heads,
            body=body,
            notes=notes,
            charts=charts,
        )
    return out
