"""`layerprune export`: a model folder in the formats serving engines load (GGUF for llama.cpp)."""

from __future__ import annotations

from .common import positive_int


def cmd_export(args) -> int:
    from ..api import export_gguf

    out = export_gguf(
        args.model_dir,
        args.gguf,
        outtype=args.outtype,
        quant=args.quant,
        imatrix=args.imatrix,
        imatrix_samples=args.imatrix_samples,
        imatrix_seqlen=args.imatrix_seqlen,
        converter=args.converter,
        overwrite=args.overwrite,
        threads=args.threads,
    )
    from ..models.llamacpp import architecture, stored_outtype

    kind = args.quant or args.outtype or stored_outtype(args.model_dir)
    if args.imatrix:
        kind += f", importance matrix from {args.imatrix}"
    size = out.stat().st_size / 2**20
    print(f"wrote {out} (llama.cpp architecture {architecture(out)}, {kind}, {size:.1f} MiB)")
    if args.quant:  # the export's record holds the file's tensor types
        import json

        from ..models.llamacpp_quant import fallback_note, sidecar

        note = fallback_note(args.quant, json.loads(sidecar(out).read_text())["tensor_types"])
        if note:
            print(f"note: {note}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert a model folder to GGUF (llama.cpp) with llama.cpp's own converter and quantizer",
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
        "--quant",
        default=None,
        metavar="TYPE",
        help="quantize with llama-quantize to TYPE (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, ...: every "
        "type it offers); writes OUT.gguf.json beside it (needs `make llamacpp`)",
    )
    p.add_argument(
        "--imatrix",
        default=None,
        metavar="SRC",
        help="with --quant: an importance matrix computed by llama-imatrix on calibration windows of this text "
        "(as --calib takes: fixture:val, a .txt/.jsonl file, c4, ...; never the held-out text)",
    )
    p.add_argument(
        "--imatrix-samples", type=positive_int, default=128, help="calibration windows (default 128)"
    )
    p.add_argument(
        "--imatrix-seqlen",
        type=positive_int,
        default=512,
        help="tokens per window (default 512, llama.cpp's)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="threads of llama.cpp's tools")
    p.add_argument(
        "--converter",
        default=None,
        help="a llama.cpp folder holding convert_hf_to_gguf.py (default: $LAYERPRUNE_LLAMA_CPP, or the "
        "one bench/serve.py --setup unpacked into the cache)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_export)
