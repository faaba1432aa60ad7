"""The comparison as numbers: one row per model (its plan, parameters, perplexities, zero-shot,
latency) and the columns the rows share (perplexities only where their protocols agree)."""

from __future__ import annotations

import json
from pathlib import Path

from .collect import _flat_numbers, _num, _ppl_results, _resolve_name, _Run, _stored_parameters

RECOVERY_TAGS = {"lora": "+LoRA", "full": "+CPT"}
# protocol fields that tell perplexity columns apart, from the coarsest
PROTOCOL_FIELDS = ("dataset", "seqlen", "bos", "windows", "text_sha256", "mask")
NO_VALUE = "—"


# ---- one row per model ------------------------------------------------------------------------
def _protocol_key(r: dict) -> tuple:
    p = {**r["protocol"], "mask": "".join(str(b) for b in r["mask"]) if r.get("mask") else None}
    return tuple(
        v if isinstance(v, (str, int, float, type(None))) else json.dumps(v, sort_keys=True)
        for v in (p.get(k) for k in PROTOCOL_FIELDS)
    )


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
    # what the numbers were computed in: the measurements' own record, else the export's
    numerics = rep.get("numerics") if isinstance(rep.get("numerics"), dict) else None
    for path, doc in run.evals:
        for r in _ppl_results(doc.get("perplexity"), f"{path}: perplexity"):
            after[_protocol_key(r)] = r
        if isinstance(doc.get("zeroshot"), dict):
            zeroshot = doc["zeroshot"]
        for key in ("latency", "memory", "gguf"):  # gguf: the file's bytes and llama-bench's tokens/s
            _flat_numbers(doc.get(key), key, latency)
        eval_params = _num(doc.get("parameters")) or eval_params
        numerics = doc.get("numerics") if isinstance(doc.get("numerics"), dict) else numerics
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
        "numerics": {k: numerics.get(k) for k in ("dtype", "device")} if numerics else None,
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


def _rows(runs: list[_Run]) -> list[dict]:
    """The rows, dense first, then as given; labels made distinct; parameters relative to the base."""
    rows = [_row(r) for r in runs]
    rows.sort(key=lambda r: r["kind"] != "dense" or bool(r["recovery"]))  # dense first, then as given
    seen: dict[str, int] = {}
    for r in rows:  # two folders of one name: say which
        seen[r["label"]] = seen.get(r["label"], 0) + 1
    for r in rows:
        if seen[r["label"]] > 1 and r["folder"]:
            r["label"] = f"{Path(r['folder']).parent.name}/{Path(r['folder']).name}"
    _fill_base(rows)
    return rows


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
