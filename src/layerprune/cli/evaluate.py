"""`layerprune eval`: perplexity and zero-shot accuracy (under an optional layer mask)."""

from __future__ import annotations

from ..errors import LayerpruneError
from . import common
from .common import _batch, _check_output, _common, _model, _output, mask_bits, non_negative_int, positive_int


def cmd_eval(args) -> int:
    import contextlib

    import layerprune as lp

    from ..io import atomic_write_json

    if args.engine == "llama.cpp":
        return _eval_llamacpp(args)
    if args.speed or args.tokenizer or args.threads:
        raise LayerpruneError("--speed, --tokenizer and --threads are for --engine llama.cpp (a .gguf file)")
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


def _eval_llamacpp(args) -> int:
    """A .gguf file measured inside llama.cpp: perplexity on layerprune's windows, speed in llama-bench."""
    from ..api import perplexity_gguf
    from ..evaluation.llamacpp import check_gguf, gguf_summary, speed
    from ..io import atomic_write_json, check_destination, check_file_path, check_writable
    from ..models.llamacpp_tools import find_tools
    from ..provenance import stamp

    gguf = check_gguf(args.model)
    find_tools()  # missing tools: the command that builds them, before any work
    if args.tasks or args.mask is not None:
        raise LayerpruneError(
            "--engine llama.cpp measures perplexity (--ppl) and speed (--speed); drop --tasks / --mask"
        )
    if not args.ppl and not args.speed:
        raise LayerpruneError(
            "nothing to evaluate; pass --ppl SOURCE (e.g. --ppl fixture:test) and/or --speed"
        )
    if args.output is not None:
        check_destination(args.output, {"model": gguf})
        check_file_path(args.output)
        check_writable(args.output)
    results = []
    for source in args.ppl or ():
        r = perplexity_gguf(gguf, source, tokenizer=args.tokenizer, seqlen=args.seqlen, bos=args.bos,
                            max_windows=args.max_windows, threads=args.threads, progress=not args.quiet)  # fmt: skip
        p = r.protocol
        print(
            f"{source}: perplexity {r.ppl:.4f} in llama.cpp  ({p['windows']} windows x {p['seqlen']} tokens, "
            f"BOS {p['bos']}, {r.seconds:.1f}s)"
        )
        results.append(r.to_dict())
    summary = gguf_summary(gguf)
    facts = {"bytes": summary["bytes"]}
    if args.speed:
        s = speed(gguf, threads=args.threads)
        print(
            f"llama-bench: prompt {s['pp128_tokens_per_s']:.1f} tok/s, generation {s['tg64_tokens_per_s']:.1f} tok/s"
        )
        facts.update({"pp128 tok/s": s["pp128_tokens_per_s"], "tg64 tok/s": s["tg64_tokens_per_s"]})
    if args.output:
        doc = {
            "model": str(args.model),
            "model_path": None,
            "model_fingerprint": summary["fingerprint"],
            "numerics": {"dtype": summary["type"], "device": "llama.cpp (CPU)"},
            "tensor_types": summary["tensor_types"],  # the type's recipe on this model's shapes
            "parameters": summary["parameters"],
            "gguf": facts,
            "speed": s if args.speed else None,
            "record": summary["record"],
            "perplexity": results,
            "zeroshot": None,
            **stamp(),
        }
        atomic_write_json(args.output, doc)
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
    g = p.add_argument_group("llama.cpp (a .gguf file; needs `make llamacpp`)")
    g.add_argument(
        "--engine",
        choices=("torch", "llama.cpp"),
        default="torch",
        help="llama.cpp: the GGUF's perplexity computed by llama.cpp on layerprune's windows (default torch)",
    )
    g.add_argument("--speed", action="store_true", help="prompt / generation tokens/s in llama-bench")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="the model whose tokenizer makes the windows (default: the folder the GGUF was exported from)",
    )
    g.add_argument(
        "--threads", type=positive_int, default=None, help="llama.cpp threads (default: cores, ≤ 8)"
    )
    _output(p, "write results JSON here", required=False)
    _common(p)
    p.set_defaults(func=cmd_eval)
