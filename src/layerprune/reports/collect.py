"""Reading the inputs of `layerprune report` (model folders, report.json files, eval results, folders
holding them) and matching each eval results file to the model folder it names."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerpruneError

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "models" / "fixture"
ACCEPTS = (
    "pass a model folder exported by `layerprune apply`, an eval results file "
    "(`layerprune eval MODEL -o results.json`), or a folder holding them"
)


@dataclass
class _Run:
    label: str
    folder: Path | None = None  # resolved model folder
    report: dict | None = None
    fingerprint: str | None = None
    evals: list[tuple[Path, dict]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


# ---- reading the inputs -----------------------------------------------------------------------
def _is_report(doc) -> bool:
    """report.json of `layerprune.export`: its plan is null for a model no plan made (a dense model
    after recovery)."""
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("base_model"), dict)
        and "plan" in doc
        and (doc["plan"] is None or isinstance(doc["plan"], dict))
    )


def _is_eval(doc) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("model"), str)
        and (isinstance(doc.get("perplexity"), list) or isinstance(doc.get("zeroshot"), dict))
    )


def _read(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayerpruneError(f"{path} is not valid JSON ({e}); {ACCEPTS}") from None


def _classify(path: Path) -> tuple[str, dict]:
    doc = _read(path)
    if _is_report(doc):
        return "report", doc
    if _is_eval(doc):
        return "eval", doc
    raise LayerpruneError(
        f"{path} is neither a layerprune report.json nor eval results (`layerprune eval -o`); {ACCEPTS}"
    )


def _is_model_folder(path: Path) -> bool:
    return (path / "report.json").is_file() or (path / "config.json").is_file()


def _folder_report(folder: Path) -> dict | None:
    file = folder / "report.json"
    if not file.is_file():
        return None
    doc = _read(file)
    if not _is_report(doc):
        raise LayerpruneError(
            f"{file} is not a layerprune report (no base_model, plan); re-export the model with `layerprune apply`"
        )
    return doc


def _collect(paths: list[Path]) -> tuple[list[_Run], list[tuple[Path, dict]], list[str]]:
    """Model folders (with their report.json) and eval results files, in the order given."""
    runs: dict[Path, _Run] = {}
    evals: dict[Path, dict] = {}
    skipped: list[str] = []

    def add_folder(folder: Path, doc: dict | None = None) -> None:
        key = folder.resolve()
        if key not in runs:
            runs[key] = _Run(
                label=key.name, folder=key, report=doc if doc is not None else _folder_report(key)
            )
            runs[key].sources.append(str(folder))

    for path in paths:
        if not path.exists():
            raise LayerpruneError(f"{path} does not exist; {ACCEPTS}")
        if path.is_dir():
            if _is_model_folder(path):
                add_folder(path)
                continue
            found = 0
            for child in sorted(path.iterdir()):
                if child.name.startswith("."):
                    continue
                if child.is_dir() and _is_model_folder(child):
                    add_folder(child)
                    found += 1
                elif child.is_file() and child.suffix == ".json":
                    try:
                        doc = _read(child)
                    except LayerpruneError:
                        doc = None
                    if _is_eval(doc):
                        evals.setdefault(child.resolve(), doc)
                        found += 1
                    else:
                        skipped.append(str(child))
            if not found:
                raise LayerpruneError(
                    f"{path} has neither report.json / config.json nor eval results (nor sub-folders with them); {ACCEPTS}"
                )
        else:
            kind, doc = _classify(path)
            if kind == "report":
                add_folder(path.parent, doc)
            else:
                evals.setdefault(path.resolve(), doc)
    return list(runs.values()), list(evals.items()), skipped


def _eval_folder(doc: dict) -> Path | None:
    """The model folder an eval results file names: its model_path, or its model argument."""
    if doc.get("model_path"):
        return Path(doc["model_path"]).expanduser().resolve()
    name = doc["model"]
    if name == "fixture":
        return FIXTURE_DIR
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def _attach(runs: list[_Run], evals: list[tuple[Path, dict]]) -> list[_Run]:
    for path, doc in evals:
        folder = _eval_folder(doc)
        fp = doc.get("model_fingerprint")
        run = next((r for r in runs if folder is not None and r.folder == folder), None)
        if run is None and fp:
            run = next((r for r in runs if r.fingerprint == fp), None)
        if run is None:
            if folder is not None and folder.is_dir() and _is_model_folder(folder):
                local = Path(doc["model"]).expanduser().is_dir()
                run = _Run(
                    label=folder.name if local else doc["model"], folder=folder, report=_folder_report(folder)
                )
            else:
                run = _Run(label=doc["model"])
            runs.append(run)
        run.evals.append((path, doc))
        run.sources.append(str(path))
        run.fingerprint = run.fingerprint or fp
    return runs


def _stored_parameters(folder: Path | None) -> tuple[int, int] | None:
    """(all, 2-D tensors of numbered blocks) element counts from the *.safetensors headers only.

    An output embedding that config.json says is tied to the input one is counted once, as
    `model.parameters()` counts it, even when the checkpoint stores it twice."""
    if folder is None:
        return None
    files = [f for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith(".")]
    if not files:
        return None
    header: dict = {}
    try:
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 2**20:
                    return None
                header.update(json.loads(fh.read(n)))
        header.pop("__metadata__", None)
        shapes = {name: list(t["shape"]) for name, t in header.items()}
        config = (
            json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    if isinstance(config, dict) and config.get("tie_word_embeddings"):
        inputs = [s for name, s in shapes.items() if name.endswith(("embed_tokens.weight", "wte.weight"))]
        for name in [n for n in shapes if n.endswith(("lm_head.weight", "embed_out.weight"))]:
            if shapes[name] in inputs:
                del shapes[name]
    total = linear = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        total += numel
        if len(shape) == 2 and re.search(r"\.\d+\.", name):
            linear += numel
    return total, linear


def _resolve_name(name) -> Path | None:
    if not isinstance(name, str):
        return None
    if name == "fixture":
        return FIXTURE_DIR
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


# ---- the records inside them: perplexity results, latency / memory numbers ----------------------
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _ppl_results(results, where: str) -> list[dict]:
    if results is None:
        return []
    if not isinstance(results, list):
        raise LayerpruneError(f"{where} must be a list of perplexity results; re-run `layerprune eval -o`")
    for i, r in enumerate(results):
        if not (
            isinstance(r, dict) and _num(r.get("ppl")) is not None and isinstance(r.get("protocol"), dict)
        ):
            raise LayerpruneError(
                f"{where}[{i}] is not a perplexity result (ppl and protocol); re-run `layerprune eval -o`"
            )
    return results


def _flat_numbers(d, prefix: str, out: dict) -> None:
    """Numeric leaves of a latency / memory record, one level of nesting deep."""
    if _num(d) is not None:
        out[prefix] = float(d)
        return
    if not isinstance(d, dict):
        return
    for k, v in d.items():
        if k in ("protocol", "settings", "config", "device", "versions"):
            continue
        if _num(v) is not None:
            out[f"{prefix} {k}"] = float(v)
        elif isinstance(v, dict) and prefix.count(" ") < 1:
            _flat_numbers(v, f"{prefix} {k}", out)
