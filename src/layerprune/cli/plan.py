"""`layerprune plan`: turn scores into a depth, sparsity or width plan (JSON)."""

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
    _searches,
    _spectral,
    fraction,
    non_negative_int,
    positive_int,
)

# Every kind's options go to the library, which refuses those that the kind of plan does not use.
PLAN_OPTIONS = (
    "protect", "iterative", "recheck", "allocation", "pruner", "nm", "epsilon", "lam", "clip", "metric",
    "lower_bound", "filter_zeros", "hyper_m", "batch_size", "store", "operators", "population", "crossovers",
    "mutations", "iterations", "p_min", "p_max", "log", "fitness_samples", "fitness_seqlen",
    "granularity", "levels", "max_levels", "levels_db", "levels_inputs", "fitness", "generations", "offspring", "survivors",
    "random_initial", "seed_scores", "unit", "deploy", "channel_multiple",
)  # fmt: skip


def cmd_plan(args) -> int:
    import layerprune as lp

    from ..distributed import is_main
    from ..reports.plots import plan_chart

    _check_output(
        args,
        args.model,
        side={"--store": args.store, "--log": args.log, "--levels-db": args.levels_db},
        scores=args.scores,
        seed_scores=args.seed_scores,
        calib=args.calib,
        store=args.store,
        level_database=args.levels_db,
        search_log=args.log,
    )
    options = _options(args, PLAN_OPTIONS)
    if args.seed and args.allocation == "search":
        options["seed"] = args.seed
    if args.llm_url or args.llm_model:
        from ..planners.search import LLMConfig

        options["llm"] = LLMConfig(url=args.llm_url, model=args.llm_model, key_env=args.llm_key_env)
    if args.sparsity is None and args.width is None:  # depth: the model is loaded only if the plan runs it
        model = common._load(args) if args.device else args.model
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
        how += f", searched from {plan.extra['start']}" if plan.method == "search" else ""
        print(
            f"depth plan ({plan.method}{how}): remove {', '.join(plan.remove)} of {plan.num_blocks} blocks; protected {plan.params['protected'] or 'none'}"
        )
    elif args.sparsity is not None:
        if args.nm:  # the pattern fixes the target: a disagreeing one is refused before the model loads
            from ..registry import check_nm_target, parse_nm

            check_nm_target(args.sparsity, parse_nm(args.nm))
        lm = common._load(args)
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
        if plan.method == "search":
            e = plan.extra
            print(
                f"searched from {e['start']}: fitness {e['best_fitness']:.4f} ({plan.params['fitness']}), "
                f"{e['evaluations_this_run']} evaluations this run, level database {e['level_database']['path']}"
            )
    else:
        lm = common._load(args)
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


def add_parser(sub) -> None:
    from ..planners.sparsity import ALLOCATIONS
    from ..registry import SPARSITY_PRUNERS as PRUNERS
    from ..scorers import WIDTH_METHODS

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
        help="per-layer allocation (default uniform; search: also depth, with --remove and no --scores; flap: width only)",
    )
    g.add_argument(
        "--pruner",
        default=None,
        choices=PRUNERS + WIDTH_METHODS,
        help="the pruner that applies it (default wanda; wanda-sp for --width, flap for --allocation flap)",
    )
    g.add_argument(
        "--nm",
        default=None,
        help="N:M pattern, N zeros in every M (2:4, 4:8): the sparsity is N/M (--sparsity 0.5 for 2:4); "
        "with alpha / owl each layer gets its own N around it",
    )
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
    _searches(p)
    _spectral(p)
    _calibration(p)
    _batch(p)
    _output(p, "the plan file to write (JSON, format layerprune.plan/2; a PNG chart beside it)")
    _no_plot(p)
    _common(p)
    p.set_defaults(func=cmd_plan)
