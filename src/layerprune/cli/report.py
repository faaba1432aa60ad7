"""`layerprune report`: pruned models side by side: Markdown, HTML, JSON and charts."""

from __future__ import annotations

from .common import _output


def cmd_report(args) -> int:
    from ..reports.compare import report

    out = report(args.runs, args.output, overwrite=args.overwrite, title=args.title)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="pruned models side by side: Markdown, HTML, JSON and charts")
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="an exported model folder, a `layerprune eval -o` results file, or a folder holding them",
    )
    _output(p, "output folder (written atomically): report.md, report.html, report.json, PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--title", default=None, help="the report's title")
    p.set_defaults(func=cmd_report)
