"""What the subcommands share: argument types, the one-line-error parser, option groups, helpers."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    _dtype(p)
    p.add_argument(
        "--max-memory",
        default=None,
        help="e.g. 8GB: a model whose weights exceed it keeps its blocks on disk and reads one at a time",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _dtype(p) -> None:
    from ..models.precision import DTYPE_CHOICES

    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="what the model computes in (default auto: the checkpoint's dtype on a GPU; on a CPU float32, "
        "or bfloat16 for ppl / bi / angular scoring where the CPU does bf16 in hardware; "
        "$LAYERPRUNE_CPU_DTYPE pins it); statistics stay accumulated in float32 / float64",
    )


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
    g.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seeds the calibration windows' offsets, and Shapley's and the searches' random draws",
    )
    g.add_argument(
        "--bos",
        choices=("none", "first", "every"),
        default=None,
        help="BOS token on no window, the first, or every one (default: as the tokenizer does; Gemma every)",
    )


def _spectral(p) -> None:
    from ..registry import SPECTRAL_METRICS as METRICS

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
    from ..data import CalibrationSpec

    return CalibrationSpec(args.calib, args.samples, args.seqlen, args.seed, args.bos)


def _check_output(args, model: str, file: bool = True, side: dict | None = None, **inputs) -> None:
    """Refuse, before any work, an output that is, contains or lies inside an input of the command:
    the model (its folder, or the GGUF file it was converted from) and `inputs` ({what: path});
    or a folder where a file is written. `side`: {option: path} of the outputs a command also
    writes (a store, a level database), which must stay out of the model."""
    from ..io import check_destination, check_file_path, check_writable
    from ..models.loading import resolve

    model_inputs = {"model folder": resolve(model)[1]}
    if Path(model).expanduser().is_file():  # a GGUF file
        model_inputs["model"] = model
    for option, path in (side or {}).items():
        if path is not None:
            check_destination(path, model_inputs, option=option)
    if args.output is not None:
        named = {what.replace("_", " "): path for what, path in inputs.items()}
        check_destination(args.output, {**model_inputs, **named})
        if file:
            check_file_path(args.output)
        check_writable(args.output)


def _load(args, model: str | None = None, stage: str | None = None):
    """The command's model; `stage` ('score:ppl') lets `--dtype auto` choose bf16 on a CPU that has it."""
    import layerprune as lp

    return lp.load(
        model or args.model,
        device=args.device,
        dtype=args.dtype,
        quiet=args.quiet,
        max_memory=args.max_memory,
        stage=stage,
    )


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


def _searches(p) -> None:
    """`plan`'s searches: Self-Pruner's of widths, EvoPress's of sparsity levels and depth sets."""
    g = p.add_argument_group("width (Self-Pruner)")
    g.add_argument(
        "--width",
        type=float,
        default=None,
        help="fraction of the blocks' prunable parameters to remove, in (0, 1)",
    )
    g.add_argument(
        "--deploy",
        choices=("decilm",),
        default=None,
        help="keep every block to what DeciLM / Nemotron-NAS carries (vLLM, llama.cpp, mlx-lm load it): "
        "attention whole or removed, MLP widths in multiples of --channel-multiple",
    )
    g.add_argument(
        "--channel-multiple",
        type=int,
        default=None,
        help="with --deploy: MLP channels are kept in multiples of this (default 256; a multiple of 256)",
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
        help="search fitness: calibration samples drawn from --calib (default 10 width, 16 sparsity, 32 depth)",
    )
    g.add_argument(
        "--fitness-seqlen",
        type=positive_int,
        default=None,
        help="search fitness: tokens per sample (default 128; depth: 512, at most the context)",
    )
    g = p.add_argument_group(
        "search of sparsity levels or of a depth set (EvoPress): --sparsity S or --remove K with --allocation search"
    )
    g.add_argument(
        "--granularity",
        choices=("layer", "block"),
        default=None,
        help="sparsity: a level per linear layer (default) or per block",
    )
    g.add_argument(
        "--levels",
        type=fraction,
        default=None,
        help="sparsity: level step, a fraction of the median unit's weights (default 0.05)",
    )
    g.add_argument(
        "--max-levels",
        type=positive_int,
        default=None,
        help="sparsity: levels each side of the target (default 8)",
    )
    g.add_argument(
        "--levels-db", default=None, help="sparsity: the level database folder (default: in the cache)"
    )
    g.add_argument(
        "--levels-inputs",
        choices=("target", "dense"),
        default=None,
        help="sparsity: the database's statistics on the model pruned at the target (default) or dense (EvoPress)",
    )
    g.add_argument(
        "--fitness",
        choices=("kl", "nll"),
        default=None,
        help="sparsity: KL to the dense model (default) or NLL",
    )
    g.add_argument(
        "--unit",
        choices=("block", "module"),
        default=None,
        help="depth: remove blocks (default) or attention / MLP parts",
    )
    g.add_argument(
        "--seed-scores",
        nargs="+",
        type=Path,
        default=None,
        help="depth: more scores (e.g. shapley) or depth plans of K units whose removal sets seed the "
        "search; ppl and bi are computed unless given",
    )
    g.add_argument("--generations", type=non_negative_int, default=None, help="generations (default 50)")
    g.add_argument(
        "--offspring", type=positive_int, default=None, help="children per generation (default 16)"
    )
    g.add_argument(
        "--survivors",
        type=int_list,
        default=None,
        help="children kept after each stage but the last (default 4,1)",
    )
    g.add_argument(
        "--random-initial",
        type=non_negative_int,
        default=None,
        help="depth: random sets among the starts (default 0)",
    )
