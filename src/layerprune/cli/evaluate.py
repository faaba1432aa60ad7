"""`layerprune eval`: perplexity and zero-shot accuracy (under an optional layer mask)."""

from __future__ import annotations

from ..errors import LayerpruneError
from . import common
from .common import _batch, _check_output, _common, _model, _output, mask_bits, non_negative_int, positive_int


def cmd_eval(args) -> int:
    import contextlib

    import layerprune as lp

    from ..io import atomic_write_json

    if not args.ppl and not args.tasks:
        raise LayerpruneError(
            "nothing to evaluate; pass --ppl SOURCE (e.g. --ppl fixture:test) and/or --tasks NAMES (e.g. --tasks fixture)"
        )
    tasks = None
    if args.tasks:
        from ..evaluation.zeroshot import resolve_tasks

        tasks = resolve_tasks(args.tasks)  # a bad name fails here, before the model is loaded
    _check_output(args, args.model, text=args.ppl)
    lm = common._load(args)
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
        from ..evaluation.zeroshot import zeroshot

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
        from ..evaluation import results_document

        atomic_write_json(args.output, results_document(lm, args.model, results, zs, mask=args.mask))
        print(f"wrote {args.output}")
    return 0


def add_parser(sub) -> None:
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
