"""`layerprune score`: importance of each block, part, linear layer, head group or channel."""

from __future__ import annotations

from pathlib import Path

from . import common
from .common import (
    _batch,
    _calib_spec,
    _calibration,
    _chart,
    _check_output,
    _common,
    _model,
    _no_plot,
    _options,
    _output,
    _spectral,
    fraction,
    int_list,
    positive_int,
)

SCORE_OPTIONS = (
    "batch_size", "store", "protect", "steps", "norm_power", "estimator", "budget", "strata", "ratio",
    "sampler", "epochs", "schedule", "hidden", "metric", "lower_bound", "filter_zeros", "hyper_m",
)  # fmt: skip


def cmd_score(args) -> int:
    import layerprune as lp

    from ..distributed import is_main
    from ..reports.plots import importance_chart
    from ..scorers import scorer

    scorer(args.method)  # an unknown method fails before the model is loaded
    _check_output(args, args.model, side={"--store": args.store}, calib=args.calib, store=args.store)
    lm = common._load(args, stage=f"score:{args.method}")
    options = _options(args, SCORE_OPTIONS)
    if args.method == "shapley":
        options["seed"] = args.seed
    scores = lp.score(lm, args.method, _calib_spec(args), unit=args.unit, progress=not args.quiet, **options)
    if not is_main():  # under torchrun rank 0 writes the results
        return 0
    scores.save(args.output)
    c = scores.calibration
    print(
        f"{args.method} importance per {scores.unit} ({scores.seconds:.1f}s"
        + (f", calibration {c['samples']} x {c['seqlen']}" if c else "")
        + "):"
    )
    _print_importance(scores)
    print(f"wrote {args.output}")
    _chart(args, importance_chart, scores, Path(args.output).with_suffix(".png"))
    return 0


def _print_importance(scores) -> None:
    ranked = sorted(
        (i for i, v in enumerate(scores.importance) if v is not None), key=lambda i: scores.importance[i]
    )
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    for i, (u, v) in enumerate(zip(scores.units, scores.importance)):
        value = "removed" if v is None else f"{v:.6g}"
        print(f"  {u:>7}  {value:>12}  rank {rank.get(i, '-')}")


def add_parser(sub) -> None:
    from ..scorers import DEPTH_METHODS, SPARSITY_METHODS, WIDTH_METHODS

    p = sub.add_parser(
        "score", help="importance of each block, attention / MLP part, linear layer, head group or channel"
    )
    _model(p)
    p.add_argument(
        "--method",
        required=True,
        help=f"one of {', '.join(DEPTH_METHODS + SPARSITY_METHODS + WIDTH_METHODS)}",
    )
    p.add_argument(
        "--unit",
        choices=("block", "module"),
        default="block",
        help="depth: whole blocks or attention/MLP parts",
    )
    _calibration(p)
    _batch(p)
    p.add_argument(
        "--store", default=None, help="SQLite evaluation store: a killed run resumes (ppl, sleb, shapley)"
    )
    g = p.add_argument_group("sleb / taylor")
    g.add_argument("--protect", default=None, help="sleb: blocks never removed (ends, plus, none, or 0,1,-1)")
    g.add_argument(
        "--steps", type=positive_int, default=None, help="sleb: greedy removal steps (default: all)"
    )
    g.add_argument("--norm-power", type=int, default=None, choices=(1, 2), help="taylor: |s|^p (default 1)")
    g = p.add_argument_group("shapley")
    g.add_argument("--estimator", default=None, help="stratified (paper, default), shapley, kernel, exact")
    g.add_argument("--budget", type=positive_int, default=None, help="real mask evaluations (default 256)")
    g.add_argument(
        "--strata",
        type=int_list,
        default=None,
        help="kept-block counts, e.g. 11,10,9 (default from L and --target-ratio)",
    )
    g.add_argument(
        "--target-ratio",
        dest="ratio",
        type=fraction,
        default=None,
        help="the removal ratio the strata centre on (default 0.25)",
    )
    g.add_argument("--sampler", default=None, help="auto, enumerate, permutation, kernel")
    g.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="surrogate training length (full-batch steps, default 3000; epochs with --schedule reference)",
    )
    g.add_argument(
        "--schedule",
        choices=("steps", "reference"),
        default=None,
        help="surrogate SGD schedule; 'reference' = batch 300, lr 0.008, epochs (underfits small budgets)",
    )
    g.add_argument("--hidden", type=positive_int, default=None, help="surrogate width (default 2L)")
    _spectral(p)
    _output(p, "the scores file to write (JSON; a PNG chart beside it)")
    _no_plot(p)
    _common(p)
    p.set_defaults(func=cmd_score)
