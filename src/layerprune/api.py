"""The verbs of the pipeline, as plain functions: what `import layerprune as lp` offers.

    lm = lp.load("fixture")
    calib = lp.calibration(lm, "fixture:val", samples=10, seqlen=128)
    s = lp.score(lm, "ppl", calib)
    p = lp.plan(lm, s, remove=3)                      # or lp.plan(lm, sparsity=0.7, allocation="alpha", ...)
    lp.apply(lm, p, calib)
    lp.export(lm, "pruned/", p)
    lp.perplexity(lm, "fixture:test", seqlen=128).ppl

Each verb checks its input and calls the module that does the work; the CLI calls the same verbs.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import export
from .data import CalibrationSpec, Windows, calibration, resolve_calibration
from .errors import LayerpruneError
from .evaluation.perplexity import perplexity
from .io import read_json
from .models.loading import LoadedModel, load
from .plans import READABLE_FORMATS, DepthPlan, Plan, SparsityPlan, WidthPlan
from .scorers.base import Scores

__all__ = [
    "load",
    "calibration",
    "score",
    "plan",
    "apply",
    "export",
    "export_gguf",
    "perplexity",
    "perplexity_gguf",
    "info",
]


def score(
    lm: LoadedModel,
    method: str,
    calib: Windows | CalibrationSpec | str | None = None,
    *,
    unit: str = "block",
    progress: bool = True,
    **options,
) -> Scores:
    """Importance of every unit by `method`: depth methods (ppl, taylor, bi, angular, sleb, shapley)
    score blocks or attention / MLP parts; alpha scores linear layers and OWL blocks, for sparsity
    plans. `calib` defaults to the method's papers' calibration; `options` are the method's own
    (e.g. budget=256 for shapley, store="evals.sqlite" to resume); one it does not use is an error."""
    from .scorers import DATA_FREE, FEEDS, scorer
    from .scorers.run import run

    scorer(method)  # an unknown method fails before any data is read
    calib = None if method in DATA_FREE else resolve_calibration(lm, calib, FEEDS[method])
    return run(lm, method, calib, unit=unit, progress=progress, **options)


def plan(
    lm: LoadedModel | str,
    scores: Scores | str | Path | None = None,
    *,
    remove: int | None = None,
    ratio: float | None = None,
    sparsity: float | None = None,
    width: float | None = None,
    calib: Windows | CalibrationSpec | str | None = None,
    progress: bool = True,
    **options,
) -> Plan:
    """Turn scores into a plan.

    - depth: `plan(lm, scores, remove=N | ratio=R, protect=, iterative=, recheck=)`; `lm` may be a
      model name when neither `iterative` nor `recheck` needs to run the model;
    - sparsity: `plan(lm, sparsity=S, allocation="uniform|alpha|owl", pruner="magnitude|wanda|sparsegpt",
      nm="2:4", scores=alpha_or_owl_scores, epsilon=, clip=, ...)`; `calib` is what the pruner will
      calibrate on (default: the papers' 128 samples of C4, or the fixture's own text);
    - width: `plan(lm, width=B, allocation="uniform|owl|alpha|search|flap", scores=wanda_sp_scores,
      store=, operators="classic|llm", llm=LLMConfig(...), population=, iterations=, seed=, ...)`:
      one structured rate per block, mean B of the blocks' prunable parameters; `flap` is FLAP's
      global ranking of standardized FLAP scores (computed on `calib` when `scores` is None)."""
    if isinstance(scores, (str, Path)):
        scores = Scores.load(scores)
    kinds = [
        k
        for k, v in (
            ("--remove/--ratio", remove if remove is not None else ratio),
            ("--sparsity", sparsity),
            ("--width", width),
        )
        if v is not None
    ]
    if len(kinds) > 1:
        raise LayerpruneError(
            f"give one of --remove/--ratio, --sparsity, --width, not both: {' and '.join(kinds)} were given"
        )
    if sparsity is not None:
        if options.get("allocation") == "search":
            return _plan_sparsity_search(lm, sparsity, scores, calib, progress, options)
        return _plan_sparsity(lm, sparsity, scores, calib, progress, options)
    if width is not None:
        return _plan_width(lm, width, scores, calib, progress, options)
    if options.get("allocation") == "search":
        return _plan_depth_search(lm, remove, ratio, scores, calib, progress, options)
    if scores is None:
        raise LayerpruneError(
            "pass --scores scores.json for a depth plan, --sparsity S for a sparsity plan or --width B for a width plan"
        )
    from .options import accepted
    from .planners.depth import plan_depth

    if calib is not None and not isinstance(calib, str):
        raise LayerpruneError(
            "a depth plan re-scores on the calibration its scores recorded; pass a text source or None"
        )
    options = accepted(plan_depth, options, "a depth plan", generic=("batch_size",))
    return plan_depth(lm, scores, remove=remove, ratio=ratio, calib=calib, progress=progress, **options)


def _plan_sparsity(lm, sparsity, scores, calib, progress, options) -> SparsityPlan:
    from .options import accepted
    from .planners.sparsity import make_plan

    if not isinstance(lm, LoadedModel):
        lm = load(lm, quiet=not progress)
    options = accepted(make_plan, options, "a sparsity plan", generic=())
    pruner = options.get("pruner", "wanda")
    allocation = options.get("allocation", "uniform")
    needs_data = pruner != "magnitude" or (allocation == "owl" and scores is None)
    windows = resolve_calibration(lm, calib, "sparsity") if needs_data else None
    return make_plan(lm, sparsity, windows=windows, scores=scores, progress=progress, **options)


def _plan_sparsity_search(lm, sparsity, scores, calib, progress, options) -> SparsityPlan:
    """EvoPress: a level database of the pruner (built once, kept on disk), then the search."""
    import hashlib
    import json

    from .distributed import group
    from .engine.levels import LevelDatabase
    from .io import cache_root, writable_cache
    from .options import accepted
    from .planners import sparsity as sp
    from .planners.search.levels import check_request
    from .planners.sparsity_search import SparsitySearch, level_grid, search_plan
    from .planners.width_search import fitness_calibration
    from .pruners.levels import build_levels
    from .registry import SPARSITY_PRUNERS

    o = SparsitySearch(**accepted(SparsitySearch, options, "a sparsity search", generic=()))
    if scores is not None:
        raise LayerpruneError("a sparsity search computes its own seeds (OWL, AlphaPruning); drop --scores")
    if o.pruner not in SPARSITY_PRUNERS:
        raise LayerpruneError(f"unknown pruner '{o.pruner}'; use one of {', '.join(SPARSITY_PRUNERS)}")
    check_request(o.generations, o.offspring, o.survivors, o.operators, o.llm)
    if not isinstance(lm, LoadedModel):
        lm = load(lm, quiet=not progress)
    grid = level_grid(lm, sparsity, step=o.levels, granularity=o.granularity, max_levels=o.max_levels)
    windows = resolve_calibration(lm, calib, "sparsity") if o.pruner != "magnitude" or calib else None
    source = windows if windows is not None else resolve_calibration(lm, None, "sparsity")
    fw = fitness_calibration(lm, source, o.fitness_samples or 16, o.fitness_seqlen or 128)
    wanted = grid.layer_sparsities()
    path = o.levels_db
    if path is None:
        ident = [lm.fingerprint, o.pruner, windows.fingerprint if windows else None, wanted, o.levels_inputs]
        ident.append(lm.numerics_key)  # a database per precision: levels of another one are never reused
        digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
        path = cache_root() / "levels" / digest
        if not path.exists():  # a cache that cannot take the database fails before it is built
            writable_cache("levels")

    # under torchrun rank 0 builds the database (or checks the one there) and every rank reads it
    def build() -> str:
        kw = {"target": sparsity, "inputs": o.levels_inputs, "batch_size": o.batch_size, "progress": progress}
        return str(build_levels(lm, o.pruner, wanted, windows, path, **kw).path)

    db = LevelDatabase(group().from_main(build))
    db.check(lm, o.pruner, wanted, o.levels_inputs)
    seeds = {}
    for name in ("owl", "alpha"):
        try:
            extra = {"lam": o.lam} if name == "owl" else {"epsilon": o.epsilon}
            seeds[name] = sp.make_plan(
                lm, sparsity, name, o.pruner, source, progress=progress, **extra
            ).layers
        except LayerpruneError:
            continue  # an allocation infeasible at this target does not seed the search
    return search_plan(
        lm, grid, db, o.pruner, windows, fw, seeds=seeds, fitness=o.fitness, generations=o.generations,
        offspring=o.offspring, survivors=tuple(o.survivors), seed=o.seed, store=o.store, operators=o.operators,
        llm=o.llm, log=o.log, batch_size=o.batch_size, progress=progress,
    )  # fmt: skip


def _plan_depth_search(lm, remove, ratio, scores, calib, progress, options):
    """EvoPress for depth: the removal set searched, seeded from ppl and bi scores (and `scores`)."""
    from .options import accepted
    from .planners.depth import units_to_remove
    from .planners.depth_search import (
        DEPTH_FITNESS_SAMPLES,
        DEPTH_FITNESS_SEQLEN,
        DepthSearch,
        plan_sets,
        search_plan,
    )
    from .planners.search.levels import check_request
    from .planners.width_search import fitness_calibration
    from .scorers.run import run

    o = DepthSearch(**accepted(DepthSearch, options, "a depth search", generic=()))
    check_request(o.generations, o.offspring, o.survivors, o.operators, o.llm)
    if not isinstance(lm, LoadedModel):
        lm = load(lm, quiet=not progress)
    L = lm.adapter.num_blocks
    n_units = L * (1 if o.unit == "block" else 2)
    count = units_to_remove(n_units, remove, ratio)
    if count > n_units - (1 if o.unit == "block" else 0):
        raise LayerpruneError(
            f"cannot remove {count} of the {n_units} {o.unit} units of {lm.name}; use --remove {n_units - 1} or less"
        )
    base = resolve_calibration(lm, calib, "depth")
    seqlen = o.fitness_seqlen or min(DEPTH_FITNESS_SEQLEN, lm.adapter.context_length or DEPTH_FITNESS_SEQLEN)
    try:
        fw = fitness_calibration(lm, base, o.fitness_samples or DEPTH_FITNESS_SAMPLES, seqlen)
    except LayerpruneError as e:  # the default fitness (32 x 512) asks for more text than the scores do
        raise LayerpruneError(
            f"{e} (for the search's fitness: --fitness-samples, --fitness-seqlen)"
        ) from None
    seeds, plans = {}, {}
    for s in [scores, *o.seed_scores]:
        if s is None:
            continue
        if isinstance(s, (str, Path)):
            doc = read_json(s, "seed file", "layerprune score or layerprune plan")
            s = Plan.load(s) if doc.get("format") in READABLE_FORMATS else Scores.load(s)
        if isinstance(s, Plan):
            if not isinstance(s, DepthPlan):
                raise LayerpruneError(
                    f"a {s.kind} plan cannot seed a depth search; give depth plans or scores"
                )
            plans[s.method if s.method not in plans else f"{s.method}-{len(plans)}"] = s
        else:
            seeds[s.method] = s
    # a plan the search cannot start from is refused before any seed is scored
    plan_sets(lm, plans, count, o.unit, o.protect)
    for method in ("ppl", "bi"):  # computed on the fitness windows unless a seed of that name is given
        if method not in seeds and method not in plans:
            seeds[method] = run(lm, method, fw, unit=o.unit, progress=progress)
    return search_plan(
        lm, count, fw, unit=o.unit, seeds=seeds, seed_plans=plans, protect=o.protect, generations=o.generations,
        offspring=o.offspring, survivors=tuple(o.survivors), random_initial=o.random_initial,
        seed=o.seed, store=o.store, operators=o.operators, llm=o.llm, log=o.log, batch_size=o.batch_size,
        progress=progress,
    )  # fmt: skip


def _plan_width(lm, width, scores, calib, progress, options) -> WidthPlan:
    from .options import accepted
    from .planners.width import check_request, make_plan
    from .scorers import DATA_FREE

    options = accepted(make_plan, options, "a width plan", generic=("batch_size",))
    search_keys = (
        "allocation", "p_min", "p_max", "operators", "llm", "log", "store", "fitness_samples", "fitness_seqlen",
        "deploy", "channel_multiple", "pruner",
    )  # fmt: skip
    check_request(width, **{k: options[k] for k in search_keys if k in options})
    if not isinstance(lm, LoadedModel):
        lm = load(lm, quiet=not progress)
    allocation = options.get("allocation", "uniform")
    default = "flap" if allocation == "flap" else "wanda-sp"
    pruner = scores.method if scores is not None else options.get("pruner", default)
    needs_data = (scores is None and pruner not in DATA_FREE) or allocation in ("owl", "search")
    windows = resolve_calibration(lm, calib, "width") if needs_data else None
    return make_plan(lm, width, windows=windows, scores=scores, progress=progress, **options)


def apply(
    lm: LoadedModel,
    plan: Plan | str | Path,
    calib: Windows | str | None = None,
    *,
    batch_size: int = 8,
    offload: str = "memory",
    levels_db: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Apply a plan to the loaded model, in place, after checking it against the model; return what
    was done (counts for the report). A sparsity plan calibrates its pruner on `calib`: windows, a
    text source drawn as the plan recorded, or (None) exactly the text the plan recorded; with
    `levels_db` (a searched plan's level database) its layers are copied from the database instead:
    the model the search evaluated, as EvoPress outputs it."""
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    plan.check(lm)
    if levels_db is not None:
        return _apply_levels(lm, plan, calib, levels_db)
    if isinstance(plan, DepthPlan):
        from .pruners.depth import apply as apply_depth

        if calib is not None:
            raise LayerpruneError("a depth plan needs no calibration; drop --calib")
        return apply_depth(lm, plan)
    if isinstance(plan, SparsityPlan):
        from .pruners.unstructured import apply as apply_sparsity

        windows = _plan_windows(lm, plan, calib)
        return apply_sparsity(lm, plan, windows, batch_size=batch_size, offload=offload, progress=progress)
    if isinstance(plan, WidthPlan):
        from .pruners.width import apply_plan

        windows = None if plan.pruner == "magnitude-sp" else _plan_windows(lm, plan, calib)
        return apply_plan(lm, plan, windows, batch_size=batch_size, progress=progress)
    raise LayerpruneError(f"cannot apply a {type(plan).__name__}")


def _apply_levels(lm, plan, calib, path) -> dict:
    from .engine.levels import LevelDatabase

    if not isinstance(plan, SparsityPlan):
        raise LayerpruneError(f"--levels-db applies sparsity plans; this is a {plan.kind} plan")
    if calib is not None:
        raise LayerpruneError("a plan applied from its level database needs no calibration; drop --calib")
    db = LevelDatabase(path)
    targets = {n: s for n, s in plan.layers.items() if s > 1e-12}
    db.check(lm, plan.pruner, {n: [s] for n, s in targets.items()})
    lm.adapter.require_in_memory("applying a plan from its level database")
    db.assign(lm.adapter, targets)
    lm.modified()
    achieved = {n: float((lm.adapter.weight(lm.adapter.layer(n)) == 0).float().mean()) for n in plan.layers}
    numel = {n: lm.adapter.layer(n).weight.numel() for n in achieved}
    return {
        "pruner": plan.pruner,
        "nm": plan.nm,
        "target": plan.target,
        "from_level_database": str(db.path),
        "achieved_mean_sparsity": sum(achieved[n] * numel[n] for n in achieved) / sum(numel.values()),
        "layers": {n: {"target": plan.layers[n], "achieved": achieved[n]} for n in achieved},
        "note": "zeros stored densely: no memory saving or speed-up without sparse kernels",
    }


def _plan_windows(lm, plan: SparsityPlan | WidthPlan, calib) -> Windows | None:
    from .data import windows_from_protocol

    if plan.pruner == "magnitude":
        if calib is not None:
            raise LayerpruneError("magnitude pruning needs no calibration; drop --calib")
        return None
    if isinstance(calib, Windows):
        return calib
    if plan.calibration is None:
        raise LayerpruneError(
            f"the plan records no calibration for {plan.pruner}; re-make it with `layerprune plan`"
        )
    return windows_from_protocol(lm, plan.calibration, calib, what="the plan")


def export_gguf(
    model_dir: str | Path,
    out: str | Path,
    *,
    outtype: str | None = None,
    quant: str | None = None,
    imatrix: str | None = None,
    imatrix_samples: int = 128,
    imatrix_seqlen: int = 512,
    converter: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> Path:
    """Convert a model folder (what `export` wrote) to GGUF with llama.cpp's own converter:
    depth-pruned and uniform-width models as their architecture, DeciLM ones as `deci`. `outtype`
    None: the type the weights are stored in (a bf16 model is not doubled to f32). `quant` (a
    llama-quantize type, e.g. Q4_K_M): then quantized by llama.cpp; `imatrix` (a text source, as
    --calib takes) steers the quantization with an importance matrix computed by llama-imatrix on
    `imatrix_samples` calibration windows of `imatrix_seqlen` tokens (seed 0) of that text."""
    from .models.llamacpp import to_gguf

    if quant is None:
        if imatrix is not None:
            raise LayerpruneError("--imatrix steers a quantization; pass --quant TYPE (e.g. Q4_K_M) with it")
        return to_gguf(model_dir, out, outtype=outtype, converter=converter, overwrite=overwrite)
    if outtype is not None:
        raise LayerpruneError("--outtype and --quant both set the GGUF's type; pass one of them")
    from .checkpoint import read_record
    from .models.llamacpp_quant import check_quant, quantize
    from .models.llamacpp_tools import find_tools

    check_quant(quant, find_tools())  # an unknown type or missing tools fail before any model is read
    plan, report = read_record(model_dir)
    record = {"plan": plan.to_dict() if plan else None, "base_model": report.get("base_model")}
    windows = tokenizer = None
    if imatrix is not None:
        lm = load(str(model_dir), quiet=True)
        if lm.tokenizer.bos_token_id is None:
            raise LayerpruneError(
                f"--imatrix separates its windows with BOS, and the tokenizer of {model_dir} has none; drop --imatrix"
            )
        # BOS first in every window: the separator llama.cpp's tokenizer cannot merge across (models/llamacpp_quant.py)
        windows = calibration(
            lm, imatrix, samples=imatrix_samples, seqlen=imatrix_seqlen, bos="first", kind="sparsity"
        )
        tokenizer = lm.tokenizer
        record["source_fingerprint"] = lm.fingerprint
    quantize(model_dir, out, quant, windows=windows, tokenizer=tokenizer, record=record, converter=converter,
             overwrite=overwrite, threads=threads)  # fmt: skip
    return Path(out)


def perplexity_gguf(
    gguf: str | Path,
    source: str,
    *,
    tokenizer: str | Path | None = None,
    seqlen: int | None = None,
    bos: str | None = None,
    max_windows: int | None = None,
    threads: int | None = None,
    progress: bool = True,
):
    """Perplexity of a .gguf file computed by llama.cpp on layerprune's windows of `source`: tokenized
    by the tokenizer of the model folder the file was exported from (its sidecar names it), or of
    `tokenizer` (a model folder or name), so that the token ids are those layerprune evaluates that
    model on. `seqlen` None: the file's context up to 2048."""
    from .data import default_bos, eval_windows, load_text
    from .data.windows import check_seqlen
    from .evaluation.llamacpp import check_gguf, context_length, perplexity_in_llamacpp
    from .models.llamacpp_quant import sidecar
    from .models.loading import read_tokenizer, resolve

    gguf = check_gguf(gguf)
    if tokenizer is None:
        side = sidecar(gguf)
        source_dir = (
            read_json(side, "GGUF record", "layerprune export").get("source") if side.is_file() else None
        )
        if not source_dir or not Path(source_dir).is_dir():
            raise LayerpruneError(
                f"{gguf.name} names no model folder whose tokenizer makes the windows (no {side.name}, or its "
                "source is gone); pass --tokenizer MODEL_DIR"
            )
        tokenizer = source_dir
    tok = read_tokenizer(resolve(str(tokenizer))[0], None, str(tokenizer))
    context = context_length(gguf)
    seqlen = (min(context, 2048) if context else 2048) if seqlen is None else seqlen
    check_seqlen(seqlen, context)
    windows = eval_windows(tok, load_text(source, "test"), seqlen, bos or default_bos(tok), max_windows)
    return perplexity_in_llamacpp(gguf, windows, threads=threads, progress=progress)


def info(lm: LoadedModel) -> dict:
    """What a model is made of: architecture, blocks, parameters per block and part, fingerprint."""
    from .models.adapter import Unit

    a = lm.adapter
    per_block = [sum(p.numel() for p in b.parameters()) for b in a.blocks]
    parts = None
    if a.has_parts():
        parts = [[a.unit_params(Unit(i, "attn")), a.unit_params(Unit(i, "mlp"))] for i in range(a.num_blocks)]
    return {
        "model": lm.name,
        "path": str(lm.path) if lm.path else None,
        "architecture": a.spec.name,
        "class": type(lm.model).__name__,
        "blocks": a.num_blocks,
        "parameters": sum(p.numel() for p in lm.model.parameters()),
        "parameters_in_blocks": sum(per_block),
        "parameters_per_block": per_block,
        "parameters_per_part": parts,
        "linear_roles": a.roles,
        "has_attention_mlp_split": a.has_parts(),
        "context_length": a.context_length,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "fingerprint": lm.fingerprint,
    }
