"""`layerprune recover`: retrain a pruned model (LoRA or all weights) and merge."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LayerpruneError
from . import common
from .common import (
    _check_output,
    _common,
    _no_plot,
    _options,
    _output,
    fraction,
    non_negative_int,
    positive_int,
)

RECOVER_OPTIONS = (
    "steps", "epochs", "batch_size", "grad_accum", "lr", "warmup", "rank", "alpha", "dropout", "seed",
    "save_every", "kd_temperature", "kd_mix",
)  # fmt: skip


def cmd_recover(args) -> int:
    import layerprune as lp

    from ..checkpoint import read_record
    from ..io import atomic_write_json
    from ..recovery import RecoveryConfig, load_training_data
    from ..reports.plots import loss_chart

    teacher_folder = None
    if args.teacher is not None:
        from ..models.loading import resolve

        teacher_folder = resolve(args.teacher, quiet=True)[1]  # a teacher that does not exist: here
    _check_output(args, args.model, file=False, side={"--teacher-cache": args.teacher_cache}, data=args.data,
                  teacher=teacher_folder, teacher_cache=args.teacher_cache)  # fmt: skip
    if (args.kd_temperature is not None or args.kd_mix is not None or args.kd_topk is not None) and not (
        args.teacher or args.teacher_cache
    ):
        raise LayerpruneError("--kd-temperature, --kd-mix and --kd-topk need --teacher MODEL")
    if args.output.exists() and not args.overwrite:
        raise LayerpruneError(
            f"output folder {args.output} already exists; choose another -o or pass --overwrite"
        )
    RecoveryConfig(**_options(args, RECOVER_OPTIONS)).check()  # bad options fail before loading
    lm = common._load(args)
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
    title = f"{method}{' + KD from ' + str(args.teacher or 'a teacher cache') if args.teacher or args.teacher_cache else ''}"
    result = lp.recover(
        lm,
        data,
        method=method,
        checkpoint_dir=_checkpoints(args.output),
        progress=not args.quiet,
        teacher=args.teacher,
        teacher_cache=args.teacher_cache,
        kd_topk=args.kd_topk,
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
            loss_chart(history, folder / "loss.png", title=f"{args.model}: {title} on {args.data}")

    report = {k: v for k, v in record.items() if k not in ("plan", "versions", "created")}
    report.update(evaluation=after, recovery=result)
    out = lp.export(lm, args.output, plan, report, overwrite=args.overwrite, extras=extras)
    print(
        f"{title}: {result['steps']} steps, {result['tokens']:,} tokens in {result['seconds']:.1f}s "
        f"({result['tokens'] / max(result['seconds'], 1e-9):,.0f} tokens/s), loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}"
        + (", zeros of the sparse model kept" if result["sparsity_kept"] else "")
    )
    print(f"wrote {out} (weights merged; loss.json, loss.png, report.json)")
    return 0


def _checkpoints(output: Path) -> Path:
    """The hidden folder of a run's checkpoints, next to its output (`-o .` included): a rerun resumes."""
    out = Path(os.path.abspath(output.expanduser()))
    return out.parent / f".{out.name}.recover"


def add_parser(sub) -> None:
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
    kd = p.add_argument_group("distillation from the dense model (Minitron's logit KD)")
    kd.add_argument(
        "--teacher",
        default=None,
        metavar="MODEL",
        help="distil from MODEL (the dense model the student was pruned from; same tokenizer): the loss is "
        "the forward KL of the next-token distributions",
    )
    kd.add_argument(
        "--kd-temperature", type=float, default=None, help="temperature T of the KL, times T^2 (default 1.0)"
    )
    kd.add_argument(
        "--kd-mix",
        type=float,
        default=None,
        help="share of the language-model loss mixed in, in [0, 1] (default 0: distillation alone)",
    )
    kd.add_argument(
        "--teacher-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the teacher once into DIR (its top-k log-probabilities per token) and train from it; "
        "an existing cache is reused without loading the teacher",
    )
    kd.add_argument(
        "--kd-topk",
        type=positive_int,
        default=None,
        help="with --teacher-cache: log-probabilities kept per token, plus the rest's mass (default 64)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (at least 1)")
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
