"""`layerprune demo`: the whole pipeline on the real model (SmolLM2-135M) or the fixture."""

from __future__ import annotations

from pathlib import Path

from .common import _dtype, positive_int


def cmd_demo(args) -> int:
    from ..demo import demo
    from ..io import check_destination
    from ..models.loading import resolve

    check_destination(args.output, {"model folder": resolve(args.model, quiet=args.quiet)[1]})

    sizes = {k: getattr(args, k) for k in ("eval_windows", "zeroshot_limit") if getattr(args, k) is not None}
    demo(
        args.output,
        model=args.model,
        method=args.method,
        remove=args.remove,
        recover_steps=args.recover_steps,
        quiet=args.quiet,
        device=args.device,
        dtype=args.dtype,
        **sizes,
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the real model (SmolLM2-135M) or the fixture")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("runs/demo"),
        help="folder for the pruned models, evaluations and the report",
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the real model, default; ~7 min on 2 cores) or fixture (~1 min)",
    )
    p.add_argument("--method", default="ppl", help="depth scoring method")
    p.add_argument(
        "--remove", type=positive_int, default=None, help="blocks to remove (default 20%%; 3 on the fixture)"
    )
    p.add_argument(
        "--eval-windows", type=positive_int, default=None, help="evaluate on the first N windows only"
    )
    p.add_argument(
        "--zeroshot-limit", type=positive_int, default=None, help="the first N examples of each task only"
    )
    p.add_argument(
        "--recover-steps",
        type=positive_int,
        default=None,
        help="LoRA steps (default 25; 100 on the fixture)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    _dtype(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
