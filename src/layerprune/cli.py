"""The `layerprune` command: thin subcommands over the library functions, in pipeline order.

Every error a user can cause is printed on one line that names the fix, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LayerpruneError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from .models.loading import load

    return load(args.model, device=args.device, quiet=args.quiet)


def _mask_arg(text: str | None) -> list[int] | None:
    if text is None:
        return None
    bits = text.replace(",", "").strip()
    if not bits or set(bits) - {"0", "1"}:
        raise LayerpruneError(f"--mask '{text}' must be a string of 0/1, one per unit (1 = keep)")
    return [int(b) for b in bits]


# ---- info -------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    lm = _load(args)
    a = lm.adapter
    total = sum(p.numel() for p in lm.model.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for b in a.blocks]
    info = {
        "model": args.model,
        "path": str(lm.path) if lm.path else None,
        "architecture": a.spec.name,
        "class": type(lm.model).__name__,
        "blocks": a.num_blocks,
        "parameters": total,
        "parameters_in_blocks": sum(per_block),
        "parameters_per_block": per_block,
        "linear_roles": a.roles,
        "has_attention_mlp_split": a.has_parts(),
        "context_length": a.context_length,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "fingerprint": lm.fingerprint,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"model          {args.model}" + (f"  ({lm.path})" if lm.path and str(lm.path) != args.model else "")
    )
    print(f"architecture   {info['architecture']} ({info['class']})")
    print(f"blocks         {info['blocks']}")
    print(f"parameters     {total:,} ({sum(per_block):,} in blocks, {total - sum(per_block):,} elsewhere)")
    print(f"context        {info['context_length'] or 'unbounded'}")
    print(f"linear roles   {', '.join(a.roles)}")
    print(f"fingerprint    {info['fingerprint']}")
    header = "block  parameters" + ("   attention         mlp" if a.has_parts() else "")
    print(header)
    for i, n in enumerate(per_block):
        row = f"{i:>5}  {n:>10,}"
        if a.has_parts():
            from .models.adapter import Unit

            row += f"  {a.unit_params(Unit(i, 'attn')):>10,}  {a.unit_params(Unit(i, 'mlp')):>10,}"
        print(row)
    return 0


# ---- eval -------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .evaluation.perplexity import perplexity
    from .io import atomic_write_json, check_output_outside
    from .models.loading import resolve
    from .provenance import stamp

    if not args.ppl:
        raise LayerpruneError("nothing to evaluate; pass --ppl SOURCE (e.g. --ppl fixture:test)")
    if args.output:
        check_output_outside(args.output, resolve(args.model)[1])
    mask = _mask_arg(args.mask)
    lm = _load(args)
    results = []
    for source in args.ppl:
        r = perplexity(
            lm,
            source,
            seqlen=args.seqlen,
            bos=args.bos,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            mask=mask,
            granularity=args.unit,
            progress=not args.quiet,
        )
        p = r.protocol
        print(
            f"{source}: perplexity {r.ppl:.4f}  ({p['windows']} windows x {p['seqlen']} tokens, BOS {p['bos']}, {r.seconds:.1f}s)"
        )
        results.append(r.to_dict())
    if args.output:
        doc = {"model": args.model, "model_fingerprint": lm.fingerprint, "perplexity": results, **stamp()}
        atomic_write_json(args.output, doc)
        print(f"wrote {args.output}")
    return 0


def _chart(args, kind: str, *chart_args, **kwargs) -> None:
    """Write a PNG next to the output (unless --no-plot); matplotlib is optional."""
    if args.no_plot:
        return
    from .reports import plots

    png = getattr(plots, kind)(*chart_args, **kwargs)
    if png:
        print(f"wrote {png}")


# ---- score / plan / apply ----------------------------------------------------------------------
DEPTH_CALIB = (10, 128)  # Shortened LLaMA / Cooperative Game: 10 samples x 128 tokens
SPARSITY_CALIB = (128, None)  # Wanda / SparseGPT / AlphaPruning: 128 x min(2048, context)


def _calibration(lm, args, defaults):
    from .scorers.run import calibration

    samples = args.samples if args.samples is not None else defaults[0]
    seqlen = args.seqlen if args.seqlen is not None else defaults[1]
    default_source = None if lm.name == "fixture" or defaults is DEPTH_CALIB else "c4"
    return calibration(lm, args.calib, samples, seqlen, args.seed, args.bos, default_source=default_source)


def cmd_score(args) -> int:
    from .io import check_output_outside
    from .models.loading import resolve
    from .scorers import SPARSITY_METHODS, scorer
    from .scorers.run import run

    scorer(args.method)  # an unknown method fails before the model is loaded
    check_output_outside(args.output, resolve(args.model)[1])
    lm = _load(args)
    params: dict = {} if args.batch_size is None else {"batch_size": args.batch_size}
    if args.method == "alpha":
        windows = None  # data-free
        params = {"metric": args.metric, "lower_bound": args.lower_bound}
    else:
        windows = _calibration(lm, args, SPARSITY_CALIB if args.method in SPARSITY_METHODS else DEPTH_CALIB)
    if args.store and args.method in ("ppl", "sleb", "shapley"):
        from .engine.store import EvalStore

        params["store"] = EvalStore(args.store, lm.fingerprint, windows.fingerprint, windows.protocol)
    if args.method == "sleb":
        from .planners.depth import protected_blocks

        params["steps"] = args.steps
        params["protected"] = protected_blocks(args.protect, lm.adapter.num_blocks, "sleb")
    if args.method == "taylor":
        params["norm_power"] = args.norm_power
    if args.method == "owl":
        params["hyper_m"] = args.owl_m
    if args.method == "shapley":
        params.update(
            estimator=args.estimator,
            budget=args.budget,
            seed=args.seed,
            sampler=args.sampler,
            epochs=args.epochs,
            schedule=args.schedule,
            hidden=args.hidden,
            ratio=args.target_ratio,
        )
        if args.strata:
            try:
                params["strata"] = [int(k) for k in args.strata.split(",")]
            except ValueError:
                raise LayerpruneError(
                    f"--strata '{args.strata}': give kept-block counts like 11,10,9"
                ) from None
    scores = run(lm, args.method, windows, unit=args.unit, progress=not args.quiet, **params)
    scores.save(args.output)
    calib = f", calibration {windows.protocol['samples']} x {windows.protocol['seqlen']}" if windows else ""
    print(f"{args.method} importance per {scores.unit} ({scores.seconds:.1f}s{calib}):")
    _print_importance(scores)
    print(f"wrote {args.output}")
    _chart(args, "importance_chart", scores, Path(args.output).with_suffix(".png"))
    return 0


def _print_importance(scores, removed=()) -> None:
    ranked = sorted(
        (i for i, v in enumerate(scores.importance) if v is not None), key=lambda i: scores.importance[i]
    )
    rank = {i: r + 1 for r, i in enumerate(ranked)}
    for i, (u, v) in enumerate(zip(scores.units, scores.importance)):
        mark = "  <- removed" if u in removed else ""
        value = "removed" if v is None else f"{v:.6g}"
        print(f"  {u:>7}  {value:>12}  rank {rank.get(i, '-')}{mark}")


def cmd_plan(args) -> int:
    from .io import check_output_outside
    from .models.loading import resolve

    check_output_outside(args.output, resolve(args.model)[1])
    if args.sparsity is not None:
        return _plan_sparsity(args)
    if args.scores is None:
        raise LayerpruneError("pass --scores scores.json (depth) or --sparsity S (unstructured / N:M)")
    return _plan_depth(args)


def _plan_depth(args) -> int:
    from .models.adapter import spec_for
    from .models.loading import load_config
    from .planners.depth import make_plan
    from .scorers.base import Scores

    scores = Scores.load(args.scores)
    if scores.unit not in ("block", "module"):
        raise LayerpruneError(
            f"{args.scores} holds {scores.method} scores per {scores.unit}: use --sparsity S to plan with them"
        )
    config = load_config(args.model)
    spec = spec_for(config)
    L = config.num_hidden_layers
    expected = L * (1 if scores.unit == "block" else 2)
    if len(scores.units) != expected or scores.model.get("num_blocks") != L:
        raise LayerpruneError(
            f"{args.scores} scores {len(scores.units)} {scores.unit} units but {args.model} has {expected} "
            f"({spec.name}, {L} blocks); score this model with `layerprune score`"
        )
    rescore = None
    lm = None
    if args.iterative and scores.method not in ("sleb", "angular"):
        lm = _load(args)
        rescore = _rescorer(lm, scores, args)
    evaluate = _set_evaluator(lm or _load(args), scores, args) if args.recheck else None
    plan = make_plan(
        scores,
        remove=args.remove,
        ratio=args.ratio,
        protect=args.protect,
        iterative=args.iterative,
        rescore=rescore,
        recheck=args.recheck,
        evaluate=evaluate,
    )
    plan.save(args.output)
    print(
        f"depth plan ({plan.method}{', iterative' if args.iterative else ''}): remove {', '.join(plan.remove)} "
        f"of {scores.model['num_blocks']} blocks; protected {plan.params['protected'] or 'none'}"
    )
    print(f"wrote {args.output}")
    _chart(args, "importance_chart", scores, Path(args.output).with_suffix(".png"), removed=plan.remove)
    return 0


def _plan_sparsity(args) -> int:
    from .planners.sparsity import make_plan
    from .pruners.unstructured import parse_nm

    nm = parse_nm(args.nm)
    lm = _load(args)
    needs_data = args.pruner != "magnitude" or args.allocation == "owl"
    windows = _calibration(lm, args, SPARSITY_CALIB) if needs_data else None
    plan = make_plan(
        lm,
        args.sparsity,
        args.allocation,
        args.pruner,
        windows,
        nm=nm,
        epsilon=args.epsilon,
        metric=args.metric,
        lower_bound=args.lower_bound,
        hyper_m=args.owl_m,
        lam=args.owl_lambda,
        clip=args.clip,
        batch_size=args.batch_size or 8,
        progress=not args.quiet,
    )
    plan.save(args.output)
    layers = plan.sparsity["layers"]
    L = lm.adapter.num_blocks
    per_block = [
        sum(v for k, v in layers.items() if k.split(".")[0] == str(b)) / len(lm.adapter.roles)
        for b in range(L)
    ]
    print(
        f"sparsity plan: {args.allocation} allocation, {args.pruner} pruner"
        + (f", {nm[0]}:{nm[1]}" if nm else "")
        + f", target {args.sparsity}; per block: "
        + " ".join(f"{v:.3f}" for v in per_block)
    )
    print(f"wrote {args.output}")
    _chart(args, "allocation_chart", plan, Path(args.output).with_suffix(".png"))
    return 0


def _scores_windows(lm, scores, args):
    """The calibration windows a scores file was computed on, checked by fingerprint."""
    from .data import calibration_windows, load_text

    if lm.fingerprint != scores.model["fingerprint"]:
        raise LayerpruneError(
            f"{args.scores} was computed on model fingerprint {scores.model['fingerprint']}, "
            f"not on {args.model} ({lm.fingerprint}); re-score this model"
        )
    c = scores.calibration
    windows = calibration_windows(
        lm.tokenizer, load_text(c["dataset"], "train"), c["samples"], c["seqlen"], c["seed"], c["bos"]
    )
    if windows.fingerprint != c["fingerprint"]:
        raise LayerpruneError(
            f"the calibration data of {args.scores} ({c['dataset']}) changed since scoring; re-score"
        )
    return windows


def _set_evaluator(lm, scores, args):
    """evaluate(sets of unit indices) -> real calibration perplexity without each set (--recheck)."""
    from .engine.masked import MaskEvaluator

    windows = _scores_windows(lm, scores, args)
    evaluator = MaskEvaluator(
        lm.model, lm.adapter, windows.input_ids, granularity=scores.unit, progress=not args.quiet
    )

    def evaluate(sets):
        return evaluator.ppl([[0 if j in s else 1 for j in range(len(scores.units))] for s in sets])

    return evaluate


def _rescorer(lm, scores, args):
    from .scorers.run import run

    windows = _scores_windows(lm, scores, args)
    params = {k: v for k, v in scores.params.items() if k in ("batch_size", "norm_power")}

    def rescore(removed):
        return run(
            lm, scores.method, windows, unit=scores.unit, removed=removed, progress=not args.quiet, **params
        ).importance

    return rescore


def _plan_windows(lm, plan, args):
    """The calibration the plan recorded, or --calib SRC with the same samples and length."""
    from .data import calibration_windows, load_text

    c = plan.calibration
    if c is None:
        if args.calib is None:
            return None
        raise LayerpruneError("this plan needs no calibration; drop --calib")
    source = args.calib or c["dataset"]
    windows = calibration_windows(
        lm.tokenizer, load_text(source, "train"), c["samples"], c["seqlen"], c["seed"], c["bos"]
    )
    if args.calib is None and windows.fingerprint != c["fingerprint"]:
        raise LayerpruneError(
            f"the plan's calibration text {source} changed since planning; pass --calib SRC"
        )
    return windows


def cmd_apply(args) -> int:
    from .checkpoint import export
    from .evaluation.perplexity import perplexity
    from .io import check_output_outside
    from .models.loading import resolve
    from .plans import Plan

    plan = Plan.load(args.plan)
    model_name = args.model or plan.model["name"]
    check_output_outside(args.output, resolve(model_name)[1])
    args.model = model_name
    lm = _load(args)
    if plan.kind == "depth":
        from .pruners.depth import apply

        counts = apply(lm, plan)
        summary = (
            f"removed {', '.join(plan.remove)}: {counts['blocks_before']} -> {counts['blocks_after']} blocks, "
            f"{counts['parameters_before']:,} -> {counts['parameters_after']:,} parameters"
        )
    elif plan.kind == "sparsity":
        from .pruners.unstructured import apply

        counts = apply(
            lm,
            plan,
            _plan_windows(lm, plan, args),
            batch_size=args.batch_size,
            offload=args.offload,
            progress=not args.quiet,
        )
        summary = (
            f"{counts['pruner']} pruned {len(counts['layers'])} layers to a mean sparsity of "
            f"{counts['achieved_mean_sparsity']:.4f} (zeros stored densely: same size, same speed without sparse kernels)"
        )
    else:
        raise LayerpruneError(f"{plan.kind} plans cannot be applied by this version of layerprune")
    evaluation = []
    for source in args.eval or []:
        r = perplexity(
            lm, source, seqlen=args.eval_seqlen, batch_size=args.batch_size, progress=not args.quiet
        )
        print(
            f"{source}: perplexity {r.ppl:.4f} after pruning ({r.protocol['windows']} windows x {r.protocol['seqlen']})"
        )
        evaluation.append(r.to_dict())
    out = export(
        lm, args.output, plan, {"pruning": counts, "evaluation": evaluation}, overwrite=args.overwrite
    )
    print(summary)
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    demo(args.output, method=args.method, remove=args.remove, quiet=args.quiet)
    return 0


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default=None,
        help="calibration text (default: fixture:val for the fixture; "
        "bookcorpus for depth methods, c4 for sparsity, as the papers)",
    )
    p.add_argument(
        "--samples", type=int, default=None, help="calibration samples (default: 10 depth, 128 sparsity)"
    )
    p.add_argument(
        "--seqlen",
        type=int,
        default=None,
        help="tokens per sample (default: 128 depth, min(2048, context) sparsity)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bos", choices=("none", "first", "every"), default=None)
    p.add_argument("--batch-size", type=int, default=None, help="samples per forward")


def _add_spectral(p: argparse.ArgumentParser) -> None:
    from .scorers.spectral import METRICS

    p.add_argument(
        "--metric", default="alpha_peak", help=f"alpha: the spectral metric ({', '.join(METRICS)})"
    )
    p.add_argument(
        "--lower-bound",
        default="reference",
        choices=("reference", "corrected"),
        help="alpha_peak's xmin lower bound: the reference's log-vs-linear quirk, or 0.95 x peak",
    )
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold M x mean (5 for LLaMA)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .planners.sparsity import ALLOCATIONS
    from .pruners.unstructured import PRUNERS
    from .scorers import DEPTH_METHODS, SPARSITY_METHODS

    parser = argparse.ArgumentParser(
        prog="layerprune",
        description="Decide, layer by layer, how to prune a causal LM; apply, recover and measure the result.",
    )
    parser.add_argument("--version", action="version", version=f"layerprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="blocks, parameters per block, architecture of a model")
    p.add_argument("model", help="a local model folder, a hub id, or 'fixture'")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity (under an optional layer mask)")
    p.add_argument("model", help="a local model folder, a hub id, or 'fixture'")
    p.add_argument(
        "--ppl",
        action="append",
        metavar="SRC",
        help="text source: fixture:test, a .txt/.jsonl file or folder, wikitext2, ptb, c4 (repeatable)",
    )
    p.add_argument(
        "--seqlen", type=int, default=None, help="window length (default: model context up to 2048)"
    )
    p.add_argument(
        "--bos",
        choices=("none", "first", "every"),
        default=None,
        help="BOS policy (default: as the tokenizer does; every window for Gemma)",
    )
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mask", default=None, help="evaluate with units skipped: one 0/1 per unit, 1 = keep")
    p.add_argument(
        "--unit", choices=("block", "module"), default="block", help="what a --mask entry stands for"
    )
    p.add_argument("-o", "--output", type=Path, default=None, help="write results JSON here")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="importance of each block, attention / MLP part, or linear layer")
    p.add_argument("model", help="a local model folder, a hub id, or 'fixture'")
    p.add_argument("--method", required=True, help=f"one of {', '.join(DEPTH_METHODS + SPARSITY_METHODS)}")
    p.add_argument(
        "--unit",
        choices=("block", "module"),
        default="block",
        help="depth: whole blocks or attention/MLP parts",
    )
    _add_calibration(p)
    p.add_argument("--store", default=None, help="SQLite evaluation store: a killed run resumes (ppl, sleb)")
    p.add_argument(
        "--protect", default="default", help="sleb: blocks never removed (ends, plus, none, or 0,1,-1)"
    )
    p.add_argument("--steps", type=int, default=None, help="sleb: greedy removal steps (default: all)")
    p.add_argument("--norm-power", type=int, default=1, choices=(1, 2), help="taylor: |s|^p")
    p.add_argument(
        "--estimator", default="stratified", help="shapley: stratified (paper), shapley, kernel, exact"
    )
    p.add_argument("--budget", type=int, default=256, help="shapley: real mask evaluations")
    p.add_argument(
        "--strata",
        default=None,
        help="shapley: kept-block counts, e.g. 11,10,9 (default from L and --target-ratio)",
    )
    p.add_argument(
        "--target-ratio", type=float, default=0.25, help="shapley: the removal ratio the strata centre on"
    )
    p.add_argument(
        "--sampler", default="auto", help="shapley estimator: auto, enumerate, permutation, kernel"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="shapley: surrogate training length (full-batch steps for --schedule steps, default 3000; epochs for reference, 300)",
    )
    p.add_argument(
        "--schedule",
        choices=("steps", "reference"),
        default="steps",
        help="shapley: surrogate SGD schedule; 'reference' = batch 300, lr 0.008, epochs (underfits small budgets)",
    )
    p.add_argument("--hidden", type=int, default=None, help="shapley: surrogate width (default 2L)")
    _add_spectral(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="scores.json")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG bar chart next to the output")
    _add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="turn scores into a plan (JSON)")
    p.add_argument("model", help="the model to plan for")
    p.add_argument("--scores", type=Path, default=None, help="depth: scores.json from `layerprune score`")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--remove", type=int, default=None, help="depth: number of units to remove")
    g.add_argument("--ratio", type=float, default=None, help="depth: fraction of units to remove (rounded)")
    p.add_argument("--iterative", action="store_true", help="depth: re-score after each removal")
    p.add_argument(
        "--recheck",
        type=int,
        default=0,
        metavar="K",
        help="depth: evaluate the K most promising removal sets for real and keep the best",
    )
    p.add_argument(
        "--protect",
        default="default",
        help="depth: blocks never removed: plus (Taylor+), ends, none, or 0,1,-1 (default: plus for taylor, ends for sleb)",
    )
    p.add_argument(
        "--sparsity", type=float, default=None, help="sparsity: the target, parameter-weighted mean"
    )
    p.add_argument(
        "--allocation", default="uniform", choices=ALLOCATIONS, help="sparsity: per-layer allocation"
    )
    p.add_argument("--pruner", default="wanda", choices=PRUNERS, help="sparsity: the pruner that applies it")
    p.add_argument("--nm", default=None, help="sparsity: N:M pattern, N zeros in every M (2:4, 4:8)")
    p.add_argument(
        "--epsilon",
        type=float,
        default=None,
        help="alpha: spread (default 0.3 magnitude, 0.2 wanda/sparsegpt)",
    )
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: sparsity spread lambda")
    p.add_argument(
        "--clip",
        action="store_true",
        help="alpha: clip ratios to [0, 0.99] and re-normalise instead of failing",
    )
    _add_spectral(p)
    _add_calibration(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="plan.json")
    p.add_argument("--no-plot", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="apply a plan and write the pruned checkpoint")
    p.add_argument("plan", type=Path, help="plan.json")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--model", default=None, help="the model to prune (default: the one the plan names)")
    p.add_argument("--calib", default=None, help="sparsity: calibration text instead of the plan's")
    p.add_argument(
        "--offload",
        choices=("memory", "disk"),
        default="memory",
        help="sparsity: keep calibration activations in memory or in a temporary folder",
    )
    p.add_argument(
        "--eval", action="append", metavar="SRC", help="perplexity of the result on SRC (repeatable)"
    )
    p.add_argument("--eval-seqlen", type=int, default=None, help="window length of --eval")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_common(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled model")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
    p.add_argument("--method", default="ppl", help="depth scoring method")
    p.add_argument("--remove", type=int, default=3, help="blocks to remove")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `layerprune ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
