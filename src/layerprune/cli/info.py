"""`layerprune info`: blocks, parameters per block, architecture of a model."""

from __future__ import annotations

import json

from . import common
from .common import _common, _model


def cmd_info(args) -> int:
    from ..api import info

    d = info(common._load(args))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    total, inside = d["parameters"], d["parameters_in_blocks"]
    print(
        f"model          {args.model}" + (f"  ({d['path']})" if d["path"] and d["path"] != args.model else "")
    )
    print(f"architecture   {d['architecture']} ({d['class']})")
    print(f"blocks         {d['blocks']}")
    print(f"parameters     {total:,} ({inside:,} in blocks, {total - inside:,} elsewhere)")
    print(f"context        {d['context_length'] or 'unbounded'}")
    print(f"linear roles   {', '.join(d['linear_roles'])}")
    print(f"fingerprint    {d['fingerprint']}")
    parts = d["parameters_per_part"]
    print("block  parameters" + ("   attention         mlp" if parts else ""))
    for i, n in enumerate(d["parameters_per_block"]):
        print(f"{i:>5}  {n:>10,}" + (f"  {parts[i][0]:>10,}  {parts[i][1]:>10,}" if parts else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="blocks, parameters per block, architecture of a model")
    _model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_info)
