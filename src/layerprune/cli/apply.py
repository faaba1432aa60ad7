"""`layerprune apply`: apply a plan and write the pruned checkpoint."""

from __future__ import annotations

from pathlib import Path

from . import common
from .common import _batch, _check_output, _common, _output, positive_int


def cmd_apply(args) -> int:
    import layerprune as lp

    plan = lp.Plan.load(args.plan)
    model = args.model or plan.model["name"]
    _check_output(args, model, file=False, plan=args.plan, calib=args.calib, level_database=args.levels_db)
    lm = common._load(args, model)
    counts = lp.apply(lm, plan, args.calib, batch_size=args.batch_size, offload=args.offload,
                      levels_db=args.levels_db, progress=not args.quiet)  # fmt: skip
    from ..distributed import is_main

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
        if counts.get("format") == "decilm":
            what = (
                f"DeciLM / nemotron-nas: vLLM, llama.cpp (layerprune export --gguf) and mlx-lm load it; "
                f"removed {', '.join(counts['removed_parts']) or 'no whole parts'}"
            )
        elif counts["standard_config"]:
            what = "standard config"
        else:
            what = (
                "per-block shapes: reload with layerprune.load, or re-plan with --deploy decilm for engines"
            )
        print(
            f"{counts['pruner']} removed KV groups and channels: {counts['parameters_before']:,} -> "
            f"{counts['parameters_after']:,} parameters ({what})"
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


def add_parser(sub) -> None:
    p = sub.add_parser("apply", help="apply a plan and write the pruned checkpoint")
    p.add_argument("plan", type=Path, help="the plan file (JSON) that `layerprune plan` wrote")
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
        "--levels-db",
        default=None,
        help="a searched sparsity plan: copy its layers from this level database (the model the search evaluated)",
    )
    p.add_argument(
        "--eval", action="append", metavar="SRC", help="perplexity of the result on SRC (repeatable)"
    )
    p.add_argument("--eval-seqlen", type=positive_int, default=None, help="window length of --eval")
    _batch(p, default=8)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _common(p)
    p.set_defaults(func=cmd_apply)
