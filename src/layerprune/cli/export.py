"""`layerprune export`: a model folder in the formats serving engines load (GGUF for llama.cpp)."""

from __future__ import annotations


def cmd_export(args) -> int:
    from ..api import export_gguf

    out = export_gguf(
        args.model_dir, args.gguf, outtype=args.outtype, converter=args.converter, overwrite=args.overwrite
    )
    from ..models.llamacpp import architecture, stored_outtype

    outtype = args.outtype or stored_outtype(args.model_dir)
    print(f"wrote {out} (llama.cpp architecture {architecture(out)}, {outtype})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="convert a model folder to GGUF (llama.cpp) with llama.cpp's own converter"
    )
    p.add_argument("model_dir", help="a model folder (what `apply` or `recover` wrote)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (atomically)")
    p.add_argument(
        "--outtype",
        default=None,
        choices=("f32", "f16", "bf16", "q8_0", "auto"),
        help="tensor type of the GGUF (default: the type the folder's weights are stored in, f32 / bf16 / f16)",
    )
    p.add_argument(
        "--converter",
        default=None,
        help="a llama.cpp folder holding convert_hf_to_gguf.py (default: $LAYERPRUNE_LLAMA_CPP, or the "
        "one bench/serve.py --setup unpacked into the cache)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_export)
