"""`layerprune info`: blocks, parameters per block, architecture of a model."""

from __future__ import annotations

import json

from ..errors import LayerpruneError
from . import common
from .common import MODEL_HELP, _common


def _env(as_json: bool) -> int:
    """layerprune's cache, and which llama.cpp it uses (converter, tools, bindings) and where; what
    installs it if missing."""
    from ..io import cache_root
    from ..models.llamacpp_tools import describe

    d = {"cache": str(cache_root()), "llama.cpp": describe()}
    if as_json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"cache          {d['cache']} ($LAYERPRUNE_CACHE, else $XDG_CACHE_HOME/layerprune)")
    lc = d["llama.cpp"]
    print(f"llama.cpp      {lc['version']} (llama-cpp-python's source distribution)")
    print(f"  converter    {lc['converter'] or lc['converter_missing']}")
    print(f"  tools        {lc['tools'] or lc['tools_missing']}")
    if lc.get("build"):
        b = lc["build"]
        print(f"  built        {b['built']} ({b['seconds'] / 60:.1f} min, -j{b['jobs']})")
    return 0


def cmd_info(args) -> int:
    from ..api import info

    if args.env:
        return _env(args.json)
    if args.model is None:
        raise LayerpruneError("name a model (e.g. `layerprune info fixture`), or pass --env")
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
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--env", action="store_true", help="which llama.cpp (converter, tools) is used and where")
    _common(p)
    p.set_defaults(func=cmd_info)
