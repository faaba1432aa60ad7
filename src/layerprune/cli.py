"""The `layerprune` command: each subcommand parses its options, calls the library verbs that a
Python user would call (layerprune/api.py), and prints. No pruning logic lives here.

Every error a user can cause is printed on one line that names the fix, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from .errors import LayerpruneError

MODEL_HELP = "a local model folder, a hub id, or 'fixture'"


# ---- argument types: bad values fail at parse time, in one line --------------------------------
def int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def int_list(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' must be integers separated by commas, like 11,10,9"
        ) from None


def mask_bits(text: str) -> list[int]:
    bits = text.replace(",", "").strip()
    if not bits or set(bits) - {"0", "1"}:
        raise argparse.ArgumentTypeError(f"'{text}' must be a string of 0/1, one per unit (1 = keep)")
    return [int(b) for b in bits]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the fix, then where to read more) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"layerprune: error: {message}; see `{self.prog} --help`\n")


# ---- option groups shared by the subcommands ----------------------------------------------------
def _model(p, help=MODEL_HELP) -> None:
    p.add_argument("model", help=help)


def _common(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--max-memory",
        default=None,
        help="e.g. 8GB: a model whose weights exceed it keeps its blocks on disk and reads one at a time",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _output(p, what: str, required: bool = True) -> None:
    p.add_argument("-o", "--output", type=Path, required=required, default=None, help=what)


def _no_plot(p) -> None:
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG chart next to the output")


def _batch(p, default=None) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help="samples per forward")


def _calibration(p) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calib",
        default=None,
        help="calibration text (default: fixture:val for the fixture; bookcorpus for depth methods, c4 for sparsity, as the papers)",
    )
    g.add_argument(
        "--samples", type=positive_int, default=None, help="samples (default: 10 depth, 128 sparsity)"
    )
    g.add_argument(
        "--seqlen",
        type=positive_int,
        default=None,
        help="tokens per sample (default: 128 depth, min(2048, context) sparsity)",
    )
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--bos", choices=("none", "first", "every"), default=None)


def _spectral(p) -> None:
    from .scorers.spectral import METRICS

    g = p.add_argument_group("alpha / owl")
    g.add_argument(
        "--metric", default=None, choices=METRICS, help="alpha: the spectral metric (default alpha_peak)"
    )
    g.add_argument(
        "--lower-bound",
        default=None,
        choices=("reference", "corrected"),
        help="alpha_peak's xmin lower bound: the reference's log-vs-linear quirk (default), or 0.95 x peak",
    )
    g.add_argument(
        "--filter-zeros",
        action="store_true",
        default=None,
        help="alpha: drop eigenvalues <= 1e-5 before the fit (the reference keeps them; default off)",
    )
    g.add_argument(
        "--owl-m",
        dest="hyper_m",
        type=float,
        default=None,
        help="owl: outlier threshold M x mean (5 for LLaMA)",
    )


def _calib_spec(args):
    from .data import CalibrationSpec

    return CalibrationSpec(args.calib, args.samples, args.seqlen, args.seed, args.bos)


def _check_output(args, model: str, file: bool = True) -> None:
    """Refuse, before any work, an output inside the input model's folder (or a folder for a file)."""
    from .io import check_file_path, check_output_outside
    from .models.loading import resolve

    if args.output is not None:
        check_output_outside(args.output, resolve(model)[1])
        if file:
            check_file_path(args.output)


def _load(args, model: str | None = None):
    import layerprune as lp

    return lp.load(model or args.model, device=args.device, quiet=args.quiet, max_memory=args.max_memory)


def _chart(args, plot, *chart_args, **kwargs) -> None:
    """Write a PNG next to the output (unless --no-plot); matplotlib is optional."""
    if args.no_plot:
        return
    png = plot(*chart_args, **kwargs)
    if png:
        print(f"wrote {png}")


def _options(args, names: tuple[str, ...]) -> dict:
    """The method options the user set (None = not given: the method's default applies)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---- info -------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from .api import info

    d = info(_load(args))
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


# ---- eval -------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    import contextlib

    import layerprune as lp

    from .io import atomic_write_json

    if not args.ppl and not args.tasks:
        raise LayerpruneError(
            "nothing to evaluate; pass --ppl SOURCE (e.g. --ppl fixture:test) and/or --tasks NAMES (e.g. --tasks fixture)"
        )
    tasks = None
    if args.tasks:
        from .evaluation.zeroshot import resolve_tasks

        tasks = resolve_tasks(args.tasks)  # a bad name fails here, before the model is loaded
    _check_output(args, args.model)
    lm = _load(args)
    results = []
    for source in args.ppl or ():
        r = lp.perplexity(
            lm,
            source,
            seqlen=args.seqlen,
            bos=args.bos,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            mask=args.mask,
            granularity=args.unit,
            progress=not args.quiet,
        )
        p = r.protocol
        print(
            f"{source}: perplexity {r.ppl:.4f}  ({p['windows']} windows x {p['seqlen']} tokens, BOS {p['bos']}, {r.seconds:.1f}s)"
        )
        results.append(r.to_dict())
    zs = None
    if tasks:
        from .evaluation.zeroshot import zeroshot

        skip = lm.adapter.skip(args.mask, args.unit) if args.mask is not None else contextlib.nullcontext()
        with skip:
            zs = zeroshot(
                lm,
                tasks,
                limit=args.limit,
                batch_size=args.batch_size,
                num_fewshot=args.num_fewshot,
                progress=not args.quiet,
            )
        for name, t in zs["tasks"].items():
            err = f" ± {t['acc_stderr']:.4f}" if t["acc_stderr"] is not None else ""
            norm = f"  acc_norm {t['acc_norm']:.4f}" if t.get("acc_norm") is not None else ""
            print(
                f"{name}: acc {t['acc']:.4f}{err}{norm}  chance {t['chance']:.4f}  ({t['samples']} examples, {t['num_fewshot']}-shot)"
            )
        metrics = ", ".join(sorted({t["metric"] for t in zs["tasks"].values()}))
        print(f"zero-shot mean ({metrics}): {zs['mean']:.4f}  ({zs['seconds']:.1f}s)")
    if args.output:
        from .evaluation import results_document

        atomic_write_json(args.output, results_document(lm, args.model, results, zs, mask=args.mask))
        print(f"wrote {args.output}")
    return 0


# ---- score ------------------------------------------------------------------------------------
SCORE_OPTIONS = (
    "batch_size", "store", "protect", "steps", "norm_power", "estimator", "budget", "strata", "ratio",
    "sampler", "epochs", "schedule", "hidden", "metric", "lower_bound", "filter_zeros", "hyper_m",
)  # fmt: skip


def cmd_score(args) -> int:
    import layerprune as lp

    from .distributed import is_main
    from .reports.plots import importance_chart
    from .scorers import scorer

    scorer(args.method)  # an unknown method fails before the model is loaded
    _check_output(args, args.model)
    lm = _load(args)
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


# ---- plan -------------------------------------------------------------------------------------
# Every kind's options go to the library, which refuses those that the kind of plan does not use.
PLAN_OPTIONS = (
    "protect", "iterative", "recheck", "allocation", "pruner", "nm", "epsilon", "lam", "clip", "metric",
    "lower_bound", "filter_zeros", "hyper_m", "batch_size", "store", "operators", "population", "crossovers",
    "mutations", "iterations", "p_min", "p_max", "log", "fitness_samples", "fitness_seqlen",
)  # fmt: skip


def cmd_plan(args) -> int:
    import layerprune as lp

    from .distributed import is_main
    from .reports.plots import plan_chart

    _check_output(args, args.model)
    options = _options(args, PLAN_OPTIONS)
    if args.sparsity is None and args.width is None:  # depth: the model is loaded only if the plan runs it
        model = _load(args) if args.device else args.model
        plan = lp.plan(
            model,
            args.scores,
            remove=args.remove,
            ratio=args.ratio,
            calib=args.calib,
            progress=not args.quiet,
            **options,
        )
        how = ", iterative" if plan.params.get("iterative") else ""
        print(
            f"depth plan ({plan.method}{how}): remove {', '.join(plan.remove)} of {plan.num_blocks} blocks; protected {plan.params['protected'] or 'none'}"
        )
    elif args.sparsity is not None:
        lm = _load(args)
        plan = lp.plan(
            lm,
            args.scores,
            remove=args.remove,
            ratio=args.ratio,
            sparsity=args.sparsity,
            width=args.width,
            calib=_calib_spec(args),
            progress=not args.quiet,
            **options,
        )
        per_block = [0.0] * plan.num_blocks
        for name, v in plan.layers.items():
            per_block[int(name.split(".")[0])] += v / len(lm.adapter.roles)
        nm = f", {plan.nm[0]}:{plan.nm[1]}" if plan.nm else ""
        print(
            f"sparsity plan: {plan.method} allocation, {plan.pruner} pruner{nm}, target {args.sparsity}; per block: "
            + " ".join(f"{v:.3f}" for v in per_block)
        )
    else:
        lm = _load(args)
        if args.llm_url or args.llm_model:
            from .planners.search import LLMConfig

            options["llm"] = LLMConfig(url=args.llm_url, model=args.llm_model, key_env=args.llm_key_env)
        if args.seed and args.allocation == "search":
            options["seed"] = args.seed
        plan = lp.plan(
            lm,
            args.scores,
            remove=args.remove,
            ratio=args.ratio,
            width=args.width,
            calib=_calib_spec(args),
            progress=not args.quiet,
            **options,
        )
        p = plan.params
        print(
            f"width plan: {plan.method} allocation, {plan.pruner} scores, target {p['target']}, achieved {p['achieved']:.4f}; per block: "
            + " ".join(f"{v:.3f}" for v in p["achieved_rates"])
        )
        if "best_fitness" in plan.extra:
            print(
                f"searched: calibration perplexity {plan.extra['best_fitness']:.4f}, {plan.extra['evaluations_this_run']} evaluations this run"
            )
    if not is_main():  # under torchrun rank 0 writes the plan
        return 0
    plan.save(args.output)
    print(f"wrote {args.output}")
    _chart(args, plan_chart, plan, Path(args.output).with_suffix(".png"))
    return 0


# ---- apply ------------------------------------------------------------------------------------
def cmd_apply(args) -> int:
    import layerprune as lp

    plan = lp.Plan.load(args.plan)
    model = args.model or plan.model["name"]
    _check_output(args, model, file=False)
    lm = _load(args, model)
    counts = lp.apply(
        lm, plan, args.calib, batch_size=args.batch_size, offload=args.offload, progress=not args.quiet
    )
    from .distributed import is_main

    if not is_main():  # under torchrun every rank pruned the same weights; rank 0 evaluates and writes
        return 0
    evaluation = []
    for source in args.eval or []:
        r = lp.perplexity(
            lm, source, seqlen=args.eval_seqlen, batch_size=args.batch_size, progress=not args.quiet
        )
        print(
            f"{source}: perplexity {r.ppl:.4f} after pruning ({r.protocol['windows']} windows x {r.protocol['seqlen']})"
        )
        evaluation.append(r.to_dict())
    out = lp.export(
        lm, args.output, plan, {"pruning": counts, "evaluation": evaluation}, overwrite=args.overwrite
    )
    if plan.kind == "width":
        print(
            f"{counts['pruner']} removed KV groups and channels: {counts['parameters_before']:,} -> "
            f"{counts['parameters_after']:,} parameters ({'standard config' if counts['standard_config'] else 'per-block shapes: reload with layerprune.load'})"
        )
    elif plan.kind == "depth":
        print(
            f"removed {', '.join(plan.remove)}: {counts['blocks_before']} -> {counts['blocks_after']} blocks, "
            f"{counts['parameters_before']:,} -> {counts['parameters_after']:,} parameters"
        )
    else:
        print(
            f"{counts['pruner']} pruned {len(counts['layers'])} layers to a mean sparsity of {counts['achieved_mean_sparsity']:.4f} "
            "(zeros stored densely: same size, same speed without sparse kernels)"
        )
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from .reports.compare import report

    out = report(args.runs, args.output, overwrite=args.overwrite, title=args.title)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


# ---- recover ----------------------------------------------------------------------------------
RECOVER_OPTIONS = (
    "steps", "epochs", "batch_size", "grad_accum", "lr", "warmup", "rank", "alpha", "dropout", "seed",
    "save_every",
)  # fmt: skip


def cmd_recover(args) -> int:
    import layerprune as lp

    from .checkpoint import read_record
    from .io import atomic_write_json
    from .recovery import RecoveryConfig, load_training_data
    from .reports.plots import loss_chart

    _check_output(args, args.model, file=False)
    if args.output.exists() and not args.overwrite:
        raise LayerpruneError(
            f"output folder {args.output} already exists; choose another -o or pass --overwrite"
        )
    RecoveryConfig(**_options(args, RECOVER_OPTIONS)).check()  # bad options fail before loading
    lm = _load(args)
    data = load_training_data(lm, args.data, args.seqlen)  # bad data fails before any work
    plan, record = read_record(lm.path)
    fixture_data = args.data.startswith("fixture")
    sources = args.eval if args.eval is not None else (["fixture:test"] if fixture_data else [])

    def evaluate(when: str) -> list[dict]:
        results = []
        for source in sources:
            r = lp.perplexity(
                lm, source, seqlen=args.eval_seqlen, max_windows=args.eval_windows, progress=not args.quiet
            )
            print(
                f"{source}: perplexity {r.ppl:.4f} {when} ({r.protocol['windows']} windows x {r.protocol['seqlen']})"
            )
            results.append(r.to_dict())
        return results

    before = evaluate("before recovery")
    method = "full" if args.full else "lora"
    result = lp.recover(
        lm,
        data,
        method=method,
        checkpoint_dir=args.output.parent / f".{args.output.name}.recover",
        progress=not args.quiet,
        **_options(args, RECOVER_OPTIONS),
    )
    after = evaluate("after recovery")
    history = result.pop("history")
    losses = history["loss"] or [float("nan")]
    result.update(
        perplexity_before=before, perplexity_after=after, loss={"first": losses[0], "last": losses[-1]}
    )

    def extras(folder: Path) -> None:
        atomic_write_json(folder / "loss.json", history)
        if not args.no_plot:
            loss_chart(history, folder / "loss.png", title=f"{args.model}: {method} on {args.data}")

    report = {k: v for k, v in record.items() if k not in ("plan", "versions", "created")}
    report.update(evaluation=after, recovery=result)
    out = lp.export(lm, args.output, plan, report, overwrite=args.overwrite, extras=extras)
    print(
        f"{method}: {result['steps']} steps, {result['tokens']:,} tokens in {result['seconds']:.1f}s "
        f"({result['tokens'] / max(result['seconds'], 1e-9):,.0f} tokens/s), loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}"
        + (", zeros of the sparse model kept" if result["sparsity_kept"] else "")
    )
    print(f"wrote {out} (weights merged; loss.json, loss.png, report.json)")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    sizes = {k: getattr(args, k) for k in ("eval_windows", "zeroshot_limit") if getattr(args, k) is not None}
    demo(
        args.output,
        model=args.model,
        method=args.method,
        remove=args.remove,
        recover_steps=args.recover_steps,
        quiet=args.quiet,
        **sizes,
    )
    return 0


# ---- the parser, one function per subcommand ----------------------------------------------------
def _parser_info(sub) -> None:
    p = sub.add_parser("info", help="blocks, parameters per block, architecture of a model")
    _model(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_info)


def _parser_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy (under an optional layer mask)")
    _model(p)
    p.add_argument(
        "--ppl",
        action="append",
        metavar="SRC",
        help="text source: fixture:test, a .txt/.jsonl file or folder, wikitext2, ptb, c4 (repeatable)",
    )
    p.add_argument(
        "--seqlen", type=positive_int, default=None, help="window length (default: model context up to 2048)"
    )
    p.add_argument(
        "--bos",
        choices=("none", "first", "every"),
        default=None,
        help="BOS policy (default: as the tokenizer does; every window for Gemma)",
    )
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first N windows")
    _batch(p, default=8)
    p.add_argument(
        "--mask", type=mask_bits, default=None, help="evaluate with units skipped: one 0/1 per unit, 1 = keep"
    )
    p.add_argument(
        "--unit", choices=("block", "module"), default="block", help="what a --mask entry stands for"
    )
    g = p.add_argument_group("zero-shot (lm-eval)")
    g.add_argument(
        "--tasks",
        metavar="NAMES",
        default=None,
        help="multiple-choice tasks, comma-separated: fixture (the bundled offline tasks: fixture_kjv, "
        "fixture_wordnet, fixture_pydoc), commonsense (boolq, piqa, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa; need a network), or any lm-eval task name",
    )
    g.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N examples of each task"
    )
    g.add_argument(
        "--num-fewshot",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="examples in the prompt (default 0)",
    )
    _output(p, "write results JSON here", required=False)
    _common(p)
    p.set_defaults(func=cmd_eval)


def _parser_score(sub) -> None:
    from .scorers import DEPTH_METHODS, SPARSITY_METHODS, WIDTH_METHODS

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
    _output(p, "scores.json")
    _no_plot(p)
    _common(p)
    p.set_defaults(func=cmd_score)


def _parser_plan(sub) -> None:
    from .planners.sparsity import ALLOCATIONS
    from .pruners.unstructured import PRUNERS
    from .scorers import WIDTH_METHODS

    p = sub.add_parser("plan", help="turn scores into a plan (JSON)")
    _model(p, "the model to plan for")
    p.add_argument(
        "--scores",
        type=Path,
        default=None,
        help="scores.json from `layerprune score` (depth; alpha / owl for --sparsity)",
    )
    g = p.add_argument_group("depth")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--remove", type=positive_int, default=None, help="number of units to remove")
    x.add_argument("--ratio", type=float, default=None, help="fraction of units to remove (rounded)")
    g.add_argument("--iterative", action="store_true", default=None, help="re-score after each removal")
    g.add_argument(
        "--recheck",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="evaluate the K most promising removal sets for real and keep the best",
    )
    g.add_argument(
        "--protect",
        default=None,
        help="blocks never removed: plus (Taylor+), ends, none, or 0,1,-1 (default: plus for taylor, ends for sleb)",
    )
    g = p.add_argument_group("sparsity")
    g.add_argument(
        "--sparsity", type=float, default=None, help="the target, parameter-weighted mean, in [0, 1)"
    )
    g.add_argument(
        "--allocation",
        default=None,
        choices=ALLOCATIONS + ("search", "flap"),
        help="per-layer allocation (default uniform; search, flap: width plans only)",
    )
    g.add_argument(
        "--pruner",
        default=None,
        choices=PRUNERS + WIDTH_METHODS,
        help="the pruner that applies it (default wanda; wanda-sp for --width, flap for --allocation flap)",
    )
    g.add_argument("--nm", default=None, help="N:M pattern, N zeros in every M (2:4, 4:8)")
    g.add_argument(
        "--epsilon",
        type=fraction,
        default=None,
        help="alpha: spread (default 0.3 magnitude, 0.2 wanda/sparsegpt)",
    )
    g.add_argument(
        "--owl-lambda",
        dest="lam",
        type=float,
        default=None,
        help="owl: sparsity spread lambda (default 0.08)",
    )
    g.add_argument(
        "--clip",
        action="store_true",
        default=None,
        help="alpha: clip ratios to [0, 0.99] and re-normalise instead of failing",
    )
    g = p.add_argument_group("width (Self-Pruner)")
    g.add_argument(
        "--width",
        type=float,
        default=None,
        help="fraction of the blocks' prunable parameters to remove, in (0, 1)",
    )
    g.add_argument(
        "--operators",
        choices=("classic", "llm"),
        default=None,
        help="search operators (default classic; llm needs --llm-url and --llm-model)",
    )
    g.add_argument(
        "--llm-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1"
    )
    g.add_argument("--llm-model", default=None, help="the chat model that performs the operators")
    g.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--population", type=positive_int, default=None, help="search population (default 30)")
    g.add_argument("--iterations", type=positive_int, default=None, help="search generations (default 20)")
    g.add_argument(
        "--crossovers",
        type=non_negative_int,
        default=None,
        help="children by crossover per generation (default 10)",
    )
    g.add_argument(
        "--mutations",
        type=non_negative_int,
        default=None,
        help="children by mutation per generation (default 10)",
    )
    g.add_argument("--p-min", type=fraction, default=None, help="lowest rate of a block")
    g.add_argument("--p-max", type=fraction, default=None, help="highest rate of a block")
    g.add_argument(
        "--store", default=None, help="SQLite store of fitness evaluations: a killed search resumes"
    )
    g.add_argument("--log", default=None, help="JSONL log of the search, one line per generation (+ PNG)")
    g.add_argument(
        "--fitness-samples",
        type=positive_int,
        default=None,
        help="search fitness: calibration samples drawn from --calib (default 10)",
    )
    g.add_argument(
        "--fitness-seqlen",
        type=positive_int,
        default=None,
        help="search fitness: tokens per sample (default 128)",
    )
    _spectral(p)
    _calibration(p)
    _batch(p)
    _output(p, "plan.json")
    _no_plot(p)
    _common(p)
    p.set_defaults(func=cmd_plan)


def _parser_apply(sub) -> None:
    p = sub.add_parser("apply", help="apply a plan and write the pruned checkpoint")
    p.add_argument("plan", type=Path, help="plan.json")
    _output(p, "output folder (written atomically)")
    p.add_argument("--model", default=None, help="the model to prune (default: the one the plan names)")
    p.add_argument(
        "--calib", default=None, help="sparsity: calibration text instead of the plan's (same draw)"
    )
    p.add_argument(
        "--offload",
        choices=("memory", "disk"),
        default="memory",
        help="sparsity: calibration activations in memory or in a temporary folder",
    )
    p.add_argument(
        "--eval", action="append", metavar="SRC", help="perplexity of the result on SRC (repeatable)"
    )
    p.add_argument("--eval-seqlen", type=positive_int, default=None, help="window length of --eval")
    _batch(p, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _common(p)
    p.set_defaults(func=cmd_apply)


def _parser_recover(sub) -> None:
    p = sub.add_parser("recover", help="retrain a pruned model (LoRA or all weights) and merge")
    p.add_argument("model", help="the (pruned) model folder, or 'fixture'")
    p.add_argument(
        "--data",
        required=True,
        help="training text: fixture:train, a .txt/.jsonl file or folder, an Alpaca .jsonl "
        "(instruction/input/output), or a named corpus (alpaca, wikitext2, c4) when online",
    )
    _output(p, "output folder: the merged checkpoint (written atomically)")
    p.add_argument("--full", action="store_true", help="train every weight (continued pretraining)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=non_negative_int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default 2)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="tokens per example (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per micro-batch (8)")
    p.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per step (1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="warm-up steps (100, at most 10%%)")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=positive_int, default=None, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=fraction, default=None, help="LoRA dropout (default 0.05)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="data order and LoRA init (0)")
    p.add_argument(
        "--save-every", type=positive_int, default=None, help="checkpoint every N steps (100); reruns resume"
    )
    p.add_argument(
        "--eval",
        action="append",
        metavar="SRC",
        help="perplexity before and after on SRC (repeatable; default fixture:test for fixture data)",
    )
    p.add_argument("--eval-seqlen", type=positive_int, default=None, help="window length of --eval")
    p.add_argument("--eval-windows", type=positive_int, default=None, help="the first N windows only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _no_plot(p)
    _common(p)
    p.set_defaults(func=cmd_recover)


def _parser_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the real model (SmolLM2-135M) or the fixture")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/demo"))
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
        type=non_negative_int,
        default=None,
        help="LoRA steps (default 25; 100 on the fixture)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def _parser_report(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="layerprune",
        description="Decide, layer by layer, how to prune a causal LM; apply, recover and measure the result.",
    )
    parser.add_argument("--version", action="version", version=f"layerprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in (
        _parser_info,
        _parser_eval,
        _parser_score,
        _parser_plan,
        _parser_apply,
        _parser_recover,
        _parser_demo,
        _parser_report,
    ):
        add(sub)
    return parser


SPREAD_COMMANDS = ("score", "plan")  # what torchrun spreads over ranks
SPREAD_METHODS = ("ppl", "sleb", "shapley")  # scorers made of independent mask evaluations


def _torchrun(args) -> None:
    """Under torchrun: refuse what has nothing to spread; ranks other than 0 print and write nothing."""
    from .distributed import group, world_from_env

    rank, world, _ = world_from_env()
    if world <= 1:
        return
    if args.command == "apply":
        from .plans import Plan

        plan = Plan.load(args.plan)
        if plan.kind != "sparsity" or plan.pruner == "magnitude":
            raise LayerpruneError(
                "under torchrun apply splits the calibration of wanda / sparsegpt plans over the ranks; "
                f"this {plan.kind} plan has none to split: run it as one process"
            )
    elif args.command not in SPREAD_COMMANDS or (
        args.command == "score" and args.method not in SPREAD_METHODS
    ):
        what = f"score --method {args.method}" if args.command == "score" else args.command
        raise LayerpruneError(
            f"torchrun spreads the mask evaluations of score ({', '.join(SPREAD_METHODS)}) and plan, and the "
            f"calibration of apply (wanda, sparsegpt); {what} has none: run it as one process"
        )
    group()  # the rendezvous, before any model is loaded

    def stopped(signum, _frame):  # torchrun stops the other ranks when one fails
        raise LayerpruneError(
            f"rank {rank} was stopped (signal {signum}): another rank of this torchrun job failed or was "
            "killed; rerun the same command (any number of processes) to resume from rank 0's store"
        )

    signal.signal(signal.SIGTERM, stopped)
    if rank != 0:
        args.quiet, args.no_plot = True, True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of this process


def main(argv: list[str] | None = None) -> int:
    from . import distributed

    args = build_parser().parse_args(argv)
    try:
        _torchrun(args)
        return args.func(args)
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `layerprune ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # a path the user gave: unwritable, a folder where a file was expected, a full disk
        where = f" {e.filename}" if e.filename else ""
        print(
            f"layerprune: error: {e.strerror or e}:{where}; check the path and its permissions",
            file=sys.stderr,
        )
    finally:
        distributed.close()
    return 2


if __name__ == "__main__":
    sys.exit(main())
