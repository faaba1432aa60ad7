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

import base64
import html
import json
import math
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LayerpruneError
from ..io import atomic_dir
from .plots import pyplot, save_figure

FORMAT = "layerprune.report/1"
FIXTURE_DIR = Path(__file__).resolve().parents[1] / "models" / "fixture"
ACCEPTS = (
    "pass a model folder exported by `layerprune apply`, an eval results file "
    "(`layerprune eval MODEL -o results.json`), or a folder holding them"
)
RECOVERY_TAGS = {"lora": "+LoRA", "full": "+CPT"}
SPARSITY_NOTE = (
    "Unstructured / N:M sparsity stores its zeros densely: same parameter count, memory and speed as "
    "the dense model unless sparse kernels run it. Its charted fraction is zeros / all parameters."
)
# protocol fields that tell perplexity columns apart, from the coarsest
PROTOCOL_FIELDS = ("dataset", "seqlen", "bos", "windows", "text_sha256", "mask")
NO_VALUE = "—"


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


# ---- one row per model ------------------------------------------------------------------------
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


def _protocol_key(r: dict) -> tuple:
    p = {**r["protocol"], "mask": "".join(str(b) for b in r["mask"]) if r.get("mask") else None}
    return tuple(
        v if isinstance(v, (str, int, float, type(None))) else json.dumps(v, sort_keys=True)
        for v in (p.get(k) for k in PROTOCOL_FIELDS)
    )


def _resolve_name(name) -> Path | None:
    if not isinstance(name, str):
        return None
    if name == "fixture":
        return FIXTURE_DIR
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def _per_block(plan: dict) -> list[float] | None:
    """The fraction each plan takes from each block: depth 1 per block (0.5 per attention / MLP
    part), sparsity the mean target of its layers, width the achieved rate."""
    L = (plan.get("model") or {}).get("num_blocks")
    if not isinstance(L, int) or L < 1:
        return None
    kind = plan.get("kind")
    if kind == "depth":
        out = [0.0] * L
        for u in plan.get("remove") or []:
            block, _, part = str(u).partition(".")
            if block.isdigit() and int(block) < L:
                out[int(block)] = min(1.0, out[int(block)] + (0.5 if part else 1.0))
        return out
    if kind == "sparsity":
        blocks: dict[int, list[float]] = {}
        for name, v in (plan.get("layers") or {}).items():
            block = str(name).partition(".")[0]
            if block.isdigit() and _num(v) is not None:
                blocks.setdefault(int(block), []).append(float(v))
        return [sum(blocks[b]) / len(blocks[b]) if b in blocks else 0.0 for b in range(L)]
    if kind == "width":
        rates = (plan.get("params") or {}).get("achieved_rates")
        if isinstance(rates, list) and len(rates) == L:
            return [float(r) for r in rates]
        attn, mlp = plan.get("attn"), plan.get("mlp")
        if isinstance(attn, list) and isinstance(mlp, list) and len(attn) == len(mlp) == L:
            return [(a + m) / 2 for a, m in zip(attn, mlp)]
    return None


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if _num(x) is not None else "?"


def _describe(plan: dict | None, counts: dict, recovery: dict | None) -> tuple[str, str, dict]:
    """(kind, method text, removed units as numbers) of one row."""
    if plan is None:
        text, kind, removed = "dense", "dense", {}
    else:
        kind = plan.get("kind")
        method = plan.get("method", "?")
        params = plan.get("params") or {}
        L = (plan.get("model") or {}).get("num_blocks", "?")
        if kind == "depth":
            units = [str(u) for u in plan.get("remove") or []]
            whole = [u for u in units if "." not in u]
            parts = [u for u in units if "." in u]
            what = (
                f"{len(whole)} blocks + {len(parts)} parts of {L}" if parts else f"{len(whole)} of {L} blocks"
            )
            text = f"depth {method}, {what}"
            removed = {"units": units, "text": ", ".join(units) or NO_VALUE}
        elif kind == "sparsity":
            nm = plan.get("nm")
            target = params.get("target")
            text = f"sparsity {plan.get('pruner', '?')} {method} {_pct(target)}" + (
                f" {nm[0]}:{nm[1]}" if isinstance(nm, list) and len(nm) == 2 else ""
            )
            mean = _num(counts.get("achieved_mean_sparsity"))
            mean = _num(target) if mean is None else mean
            removed = {
                "mean_sparsity": mean,
                "text": f"mean sparsity {mean:.3f}" if mean is not None else NO_VALUE,
            }
        elif kind == "width":
            target = params.get("target")
            text = f"width {method} {_pct(target)}"
            mean = _num(params.get("achieved"))
            mean = _num(target) if mean is None else mean
            removed = {"mean_rate": mean, "text": f"mean rate {mean:.3f}" if mean is not None else NO_VALUE}
        else:
            text, removed = f"{kind} {method}", {}
    if isinstance(recovery, dict):
        m = recovery.get("method")
        text += " " + RECOVERY_TAGS.get(m, f"+{m}" if m else "+recovery")
    return kind or "?", text, removed


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


def _row(run: _Run) -> dict:
    rep = run.report or {}
    plan = rep.get("plan") if isinstance(rep.get("plan"), dict) else None
    counts = rep.get("pruning") if isinstance(rep.get("pruning"), dict) else {}
    recovery = rep.get("recovery") if isinstance(rep.get("recovery"), dict) else None
    kind, text, removed = _describe(plan, counts, recovery)
    where = run.sources[0] if run.sources else run.label

    # perplexity: eval results over the report's; with recovery, after and before
    after: dict[tuple, dict] = {}
    before: dict[tuple, dict] = {}
    evaluation = _ppl_results(rep.get("evaluation"), f"{where}: evaluation")
    for r in evaluation:  # after recovery where there was one (`layerprune recover` writes both)
        after[_protocol_key(r)] = r
    if recovery is not None:
        for r in _ppl_results(recovery.get("perplexity_after"), f"{where}: recovery.perplexity_after"):
            after[_protocol_key(r)] = r
        for r in _ppl_results(recovery.get("perplexity_before"), f"{where}: recovery.perplexity_before"):
            before[_protocol_key(r)] = r
    zeroshot, latency, eval_params = None, {}, None
    for path, doc in run.evals:
        for r in _ppl_results(doc.get("perplexity"), f"{path}: perplexity"):
            after[_protocol_key(r)] = r
        if isinstance(doc.get("zeroshot"), dict):
            zeroshot = doc["zeroshot"]
        for key in ("latency", "memory"):
            _flat_numbers(doc.get(key), key, latency)
        eval_params = _num(doc.get("parameters")) or eval_params
    ppl = {
        k: {
            "ppl": _num(after[k]["ppl"]) if k in after else None,
            "before": _num(before[k]["ppl"]) if k in before else None,
            "protocol": {
                **(after.get(k) or before[k])["protocol"],
                "mask": (after.get(k) or before[k]).get("mask"),
            },
        }
        for k in [*after, *(k for k in before if k not in after)]
    }

    stored = _stored_parameters(run.folder)
    params = _num(counts.get("parameters_after")) or eval_params or (stored[0] if stored else None)
    zeroed = None
    if kind == "sparsity":
        base_params = params
        mean = removed.get("mean_sparsity")
        if stored and stored[0] and mean is not None:
            zeroed = mean * stored[1] / stored[0]
    elif kind == "dense":
        base_params = params
    else:
        base_params = _num(counts.get("parameters_before"))
    base = (
        rep.get("base_model") if isinstance(rep.get("base_model"), dict) else (plan or {}).get("model") or {}
    )
    return {
        "label": run.label,
        "kind": kind,
        "method": text,
        "folder": str(run.folder) if run.folder else None,
        "sources": run.sources,
        "fingerprint": run.fingerprint,
        "base_model": {"name": base.get("name"), "fingerprint": base.get("fingerprint")} if base else None,
        "parameters": int(params) if params is not None else None,
        "base_parameters": int(base_params) if base_params is not None else None,
        "zeroed_fraction": zeroed,
        "removed": removed,
        "allocation": _per_block(plan) if plan else None,
        "recovery": {k: v for k, v in recovery.items() if not k.startswith("perplexity")}
        if recovery
        else None,
        "_ppl": ppl,
        "_zeroshot": zeroshot,
        "_latency": latency,
        "_base_path": _resolve_name(base.get("name")) if base else None,
    }


def _fill_base(rows: list[dict]) -> None:
    """Parameters relative to the base model: a dense row of the same model fills in what the
    report does not say; then the fraction removed (zeros for sparsity) for the chart."""
    dense = [r for r in rows if r["kind"] == "dense"]
    for r in rows:
        if r["base_parameters"] is None and r["base_model"]:
            fp, path = r["base_model"]["fingerprint"], r["_base_path"]
            for d in dense:
                if (fp and d["fingerprint"] == fp) or (path and d["folder"] == str(path)):
                    r["base_parameters"] = d["parameters"]
                    break
        p, b = r["parameters"], r["base_parameters"]
        r["parameters_fraction_of_base"] = p / b if p is not None and b else None
        r["removed_fraction"] = 1 - p / b if p is not None and b else None
        r["chart_fraction"] = r["zeroed_fraction"] if r["kind"] == "sparsity" else r["removed_fraction"]


# ---- columns ----------------------------------------------------------------------------------
def _headers(keys: list[tuple], base: int, head, labels: dict) -> dict[tuple, str]:
    """Column headers: head(key) names the first `base` fields; among keys that share those, the
    fields that differ follow (labels[i] formats field i; None says nothing). Distinct keys get
    distinct headers."""
    groups: dict[tuple, list[tuple]] = {}
    for k in keys:
        groups.setdefault(k[:base], []).append(k)
    heads = {}
    for ks in groups.values():
        varying = [i for i in labels if len({k[i] for k in ks}) > 1]
        for k in ks:
            heads[k] = " ".join([head(k), *(labels[i](k[i]) for i in varying if k[i] is not None)])
    return heads


PPL_LABELS = {
    5: lambda v: f"mask {v}",
    2: lambda v: f"BOS {v}",
    3: lambda v: f"{v} windows",
    4: lambda v: f"text {str(v)[:8]}",
}
ZS_LABELS = {2: lambda v: f"n={v}"}
MEAN_LABELS = {0: lambda v: f"({', '.join(v)})"}


def _columns(rows: list[dict]) -> dict:
    ppl_keys = list(dict.fromkeys(k for r in rows for k in r["_ppl"]))
    zs_keys, mean_keys, lat_keys = [], [], []
    for r in rows:
        r["perplexity"], r["zeroshot"], r["zeroshot_mean"], r["latency"] = {}, {}, {}, dict(r["_latency"])
        zs = r["_zeroshot"]
        tasks = zs.get("tasks") if isinstance(zs, dict) and isinstance(zs.get("tasks"), dict) else {}
        r["_zs"] = {}
        for task, d in tasks.items():
            if not isinstance(d, dict):
                continue
            metric = d.get("metric") or ("acc_norm" if "acc_norm" in d else "acc")
            key = (task, metric, d.get("samples"))
            r["_zs"][key] = {
                "value": _num(d.get(metric)),
                "stderr": _num(d.get(f"{metric}_stderr")),
                "samples": d.get("samples"),
                "chance": _num(d.get("chance")),
            }
            zs_keys.append(key)
        if tasks and _num(zs.get("mean")) is not None:
            mkey = tuple(sorted(tasks))
            r["_mean"] = (mkey, float(zs["mean"]))
            mean_keys.append(mkey)
        lat_keys += list(r["latency"])
    zs_keys = list(dict.fromkeys(zs_keys))
    mean_keys = list(dict.fromkeys(mean_keys))
    ppl_heads = _headers(ppl_keys, 2, lambda k: f"ppl {k[0]} @{k[1]}", PPL_LABELS)
    zs_heads = _headers(zs_keys, 2, lambda k: f"{k[0]} {k[1]}", ZS_LABELS)
    mean_heads = _headers([(k,) for k in mean_keys], 0, lambda k: "zero-shot mean", MEAN_LABELS)
    mean_heads = {k[0]: h for k, h in mean_heads.items()}
    for r in rows:
        for k, v in r["_ppl"].items():
            r["perplexity"][ppl_heads[k]] = {"ppl": v["ppl"], "before": v["before"]}
        for k, v in r["_zs"].items():
            r["zeroshot"][zs_heads[k]] = v
        if "_mean" in r:
            r["zeroshot_mean"][mean_heads[r["_mean"][0]]] = r["_mean"][1]
    protocols = {}
    for r in rows:
        for k, v in r["_ppl"].items():
            protocols.setdefault(ppl_heads[k], v["protocol"])
    return {
        "perplexity": [{"header": ppl_heads[k], "protocol": protocols[ppl_heads[k]]} for k in ppl_keys],
        "zeroshot": [{"header": zs_heads[k], "task": k[0], "metric": k[1], "samples": k[2]} for k in zs_keys],
        "zeroshot_mean": [{"header": mean_heads[k], "tasks": list(k)} for k in mean_keys],
        "latency": [{"header": h} for h in dict.fromkeys(lat_keys)],
    }


# ---- cells ------------------------------------------------------------------------------------
def _fmt_ppl(cell) -> str:
    if not cell:
        return NO_VALUE
    after = f"{cell['ppl']:.3f}" if cell["ppl"] is not None else NO_VALUE
    return after + (f" (before {cell['before']:.3f})" if cell["before"] is not None else "")


def _fmt_number(header: str, v: float | None) -> str:
    if v is None:
        return NO_VALUE
    if header.endswith("bytes"):
        return f"{v / 2**20:,.1f} MiB"
    return f"{v:.4g}"


def _table(rows: list[dict], columns: dict) -> tuple[list[str], list[list[str]]]:
    heads = ["model", "kind / method", "parameters", "removed"]
    heads += [c["header"] for c in columns["perplexity"]]
    heads += [f"{c['header']} (%)" for c in columns["zeroshot"]]
    heads += [f"{c['header']} (%)" for c in columns["zeroshot_mean"]]
    heads += [c["header"] for c in columns["latency"]]
    body = []
    for r in rows:
        p, f = r["parameters"], r["parameters_fraction_of_base"]
        cells = [
            r["label"],
            r["method"],
            NO_VALUE if p is None else f"{p:,}" + (f" ({100 * f:.1f}%)" if f is not None else ""),
            r["removed"].get("text", NO_VALUE),
        ]
        cells += [_fmt_ppl(r["perplexity"].get(c["header"])) for c in columns["perplexity"]]
        for c in columns["zeroshot"]:
            z = r["zeroshot"].get(c["header"])
            if not z or z["value"] is None:
                cells.append(NO_VALUE)
            else:
                cells.append(
                    f"{100 * z['value']:.1f}"
                    + (f" ± {100 * z['stderr']:.1f}" if z["stderr"] is not None else "")
                )
        for c in columns["zeroshot_mean"]:
            v = r["zeroshot_mean"].get(c["header"])
            cells.append(NO_VALUE if v is None else f"{100 * v:.1f}")
        cells += [_fmt_number(c["header"], r["latency"].get(c["header"])) for c in columns["latency"]]
        body.append(cells)
    return heads, body


def _protocol_text(p: dict) -> str:
    bits = [
        f"{p.get('dataset')}",
        f"seqlen {p.get('seqlen')}",
        f"BOS {p.get('bos')}",
        f"{p.get('windows')} windows",
        f"{p.get('tokens')} tokens scored",
    ]
    if p.get("text_sha256"):
        bits.append(f"text sha256 {str(p['text_sha256'])[:12]}")
    if p.get("mask"):
        bits.append(f"mask {''.join(str(b) for b in p['mask'])}")
    return ", ".join(bits)


def _notes(rows: list[dict], columns: dict, charts: bool | None) -> list[str]:
    notes = []
    if any(r["kind"] == "sparsity" for r in rows):
        notes.append(SPARSITY_NOTE)
    if any(r["recovery"] for r in rows):
        notes.append(
            "Recovered rows (+LoRA, +CPT): perplexity after recovery, then (before ...) the pruned model's before it."
        )
    for c in columns["perplexity"]:
        notes.append(f"{c['header']}: {_protocol_text(c['protocol'])}.")
    if columns["zeroshot"]:
        notes.append("Zero-shot: accuracy in % by each task's headline metric, ± its standard error.")
    if charts is None:
        notes.append("No charts: matplotlib is not installed (pip install matplotlib).")
    return notes


# ---- charts -----------------------------------------------------------------------------------
def _ppl_chart(plt, rows: list[dict], columns: dict, path: Path) -> Path | None:
    panels = []
    for c in columns["perplexity"]:
        pts = [
            (r, r["perplexity"][c["header"]])
            for r in rows
            if r["chart_fraction"] is not None and c["header"] in r["perplexity"]
        ]
        if pts:
            panels.append((c["header"], pts))
    if not panels:
        return None
    panels = panels[:4]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (header, pts) in zip(axes[0], panels):
        values = []
        for r, cell in pts:
            x = 100 * r["chart_fraction"]
            if cell["before"] is not None:
                ax.scatter([x], [cell["before"]], facecolors="none", edgecolors="grey", zorder=2)
                values.append(cell["before"])
                if cell["ppl"] is not None:
                    ax.plot([x, x], [cell["before"], cell["ppl"]], color="grey", lw=0.8, ls=":")
            if cell["ppl"] is not None:
                colour = {"dense": "black", "depth": "#1f77b4", "sparsity": "#d62728", "width": "#2ca02c"}
                ax.scatter([x], [cell["ppl"]], color=colour.get(r["kind"], "#9467bd"), zorder=3)
                ax.annotate(
                    r["label"], (x, cell["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
                values.append(cell["ppl"])
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("parameters removed (%; sparsity: zeros)")
        ax.set_ylabel("perplexity")
        ax.set_title(header, fontsize=9)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _allocation_chart(plt, rows: list[dict], path: Path) -> Path | None:
    pruned = [r for r in rows if r["allocation"]]
    if not pruned:
        return None
    L = max(len(r["allocation"]) for r in pruned)
    fig, axes = plt.subplots(
        len(pruned), 1, figsize=(max(6, 0.35 * L + 2), 1.2 + 1.5 * len(pruned)), sharex=True, squeeze=False
    )
    colour = {"depth": "#1f77b4", "sparsity": "#d62728", "width": "#2ca02c"}
    for ax, r in zip(axes[:, 0], pruned):
        a = r["allocation"]
        ax.bar(range(len(a)), a, color=colour.get(r["kind"], "#9467bd"))
        ax.set_ylim(0, 1)
        ax.set_ylabel("removed", fontsize=8)
        ax.set_title(f"{r['label']}: {r['method']}", fontsize=8)
    axes[-1, 0].set_xlabel(
        "block (depth: 1 = whole block, 0.5 = attention or MLP; sparsity: mean target; width: rate)"
    )
    axes[-1, 0].set_xticks(range(L))
    return save_figure(fig, path)


# ---- documents --------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, heads, body, notes, charts: list[str], when: str) -> str:
    lines = [f"# {title}", "", f"{len(body)} models, written by layerprune on {when}.", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in heads) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(heads))) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
    lines.append("")
    lines += [f"- {n}" for n in notes]
    for name in charts:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.dense td { background: #fafafa; font-weight: 600; }
ul.notes { font-size: 0.85em; color: #555; }
img { max-width: 100%; margin-top: 1em; display: block; }
"""


def _html(title: str, heads, body, rows, notes, charts: dict[str, bytes], when: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{len(body)} models, written by layerprune on {e(when)}.</p>",
        "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in heads) + "</tr></thead><tbody>",
    ]
    for r, cells in zip(rows, body):
        tds = "".join(f"<td{'' if i < 2 else ' class=num'}>{e(c)}</td>" for i, c in enumerate(cells))
        out.append(f'<tr class="{e(r["kind"])}">{tds}</tr>')
    out.append("</tbody></table>")
    out.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for name, png in charts.items():
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<img alt="{e(name)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _check_output(out: Path, inputs: Iterable[Path], overwrite: bool) -> bool:
    """Refuse an output inside an input (or an input inside the output); returns whether `out` may
    be replaced (--overwrite, or an empty folder)."""
    target = out.resolve()
    for p in inputs:
        src = p.resolve()
        if src.is_dir() and (target == src or src in target.parents):
            raise LayerpruneError(
                f"output {out} is inside the input {p}; write the report somewhere else (-o)"
            )
        if target in src.parents:
            raise LayerpruneError(f"input {p} is inside the output folder {out}; choose another -o")
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

    rows = [_row(r) for r in runs]
    rows.sort(key=lambda r: r["kind"] != "dense" or bool(r["recovery"]))  # dense first, then as given
    seen: dict[str, int] = {}
    for r in rows:  # two folders of one name: say which
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in rows:
        if seen[r["label"]] > 1 and r["folder"]:
            r["label"] = f"{Path(r['folder']).parent.name}/{Path(r['folder']).name}"
    _fill_base(rows)
    columns = _columns(rows)
    heads, body = _table(rows, columns)
    from .. import __version__

    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with atomic_dir(out, overwrite=replace) as tmp:
        plt = pyplot()
        charts: dict[str, bytes] = {}
        if plt is not None:
            for name, make in (
                ("perplexity.png", lambda p: _ppl_chart(plt, rows, columns, p)),
                ("allocation.png", lambda p: _allocation_chart(plt, rows, p)),
            ):
                if make(tmp / name):
                    charts[name] = (tmp / name).read_bytes()
        notes = _notes(rows, columns, True if plt is not None else None)
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        doc = {
            "format": FORMAT,
            "title": title,
            "created": when,
            "layerprune": __version__,
            "inputs": [str(p) for p in paths],
            "skipped": skipped,
            "columns": columns,
            "rows": public,
            "notes": notes,
            "charts": list(charts),
        }
        (tmp / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(
            _markdown(title, heads, body, notes, list(charts), when), encoding="utf-8"
        )
        (tmp / "report.html").write_text(
            _html(title, heads, body, rows, notes, charts, when), encoding="utf-8"
        )
    return out
