"""The comparison written out: the table as text cells, notes, charts (PNG), report.md, report.html
(self-contained) and report.json."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..plotting import save_figure
from .table import NO_VALUE

FORMAT = "layerprune.report/1"
SPARSITY_NOTE = (
    "Unstructured / N:M sparsity stores its zeros densely: same parameter count, memory and speed as "
    "the dense model unless sparse kernels run it. Its charted fraction is zeros / all parameters."
)


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
    numerics = any(r.get("numerics") for r in rows)  # reports of older versions do not record it
    if numerics:
        heads.append("dtype @ device")
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
        if numerics:
            n = r.get("numerics") or {}
            cells.append(f"{n.get('dtype')} @ {n.get('device')}" if n else NO_VALUE)
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


def _charts(plt, rows: list[dict], columns: dict, folder: Path) -> dict[str, bytes]:
    """The charts drawn into `folder`, their PNG bytes by file name; none when plt is None."""
    charts: dict[str, bytes] = {}
    if plt is not None:
        for name, make in (
            ("perplexity.png", lambda p: _ppl_chart(plt, rows, columns, p)),
            ("allocation.png", lambda p: _allocation_chart(plt, rows, p)),
        ):
            if make(folder / name):
                charts[name] = (folder / name).read_bytes()
    return charts


def _write(
    folder: Path,
    *,
    title: str,
    when: str,
    paths: list[Path],
    skipped: list[str],
    rows: list[dict],
    columns: dict,
    heads: list[str],
    body: list[list[str]],
    notes: list[str],
    charts: dict[str, bytes],
) -> None:
    """report.json, report.md and report.html into `folder`."""
    from .. import __version__

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
    (folder / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(
        _markdown(title, heads, body, notes, list(charts), when), encoding="utf-8"
    )
    (folder / "report.html").write_text(
        _html(title, heads, body, rows, notes, charts, when), encoding="utf-8"
    )
