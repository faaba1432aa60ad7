"""Prune or quantize? The size–quality–speed frontier of pruned × quantized SmolLM2-135M-Instruct in llama.cpp.

    python bench/frontier.py [--grid reduced|medium|full] [--windows 4] [--rounds 3] [--threads 1] [--no-speed]
    python bench/frontier.py --points "dense Q2_K,width-20 Q2_K imatrix"   # only these points
    python bench/frontier.py --charts      # the charts and the answer from frontier.json, nothing measured
    python bench/frontier.py --markdown    # the docs page's tables

Models (made once, kept: a rerun reuses them): dense; depth-pruned at 10 / 20 / 30 % of the blocks'
parameters: the depth search's best set (search.json depth-N-fit512, `_models.depth_search_blocks`) where
it ran (20 %: 6 blocks, 30 %: 9), else Shortened LLaMA's ppl criterion on 10 x 128 tokens of fixture:val
(10 %), in bench/work/frontier/; the deployable searched width (`_models.deploy_search`: `--allocation
search --deploy decilm`, short search) at 10 / 20 / 30 %, in bench/work/models/; and each of those
recovered, "<model> kd": issue 34's best recovery (bench/recover.py's smollm2 rows), full training with
distillation from the cached SmolLM2 teacher (top-64 log-probabilities), 20 steps x batch 4 of 128 tokens
of fixture:train, lr 2e-4, in bench/work/models/<model>.kd.

Points (`points`): every model exported by `layerprune export --quant TYPE [--imatrix fixture:val]` (the
calibration text, never the held-out text; 8 windows of 512 tokens), perplexity computed by llama.cpp
on layerprune's held-out windows (fixture:test, seqlen 512, the first --windows windows), file bytes;
then speed in --rounds interleaved rounds over every file, as ratios to dense Q4_K_M in the same round
(medians): tokens per CPU-second of one llama.cpp thread, prompt 128 and generation 64 tokens
(`cpu_speed`; --speed-by wall: llama-bench's wall clock, which a niced process on this shared machine
cannot measure: one file's generation varied 18-fold between two rounds of an earlier run). Checks: per model, llama.cpp's
perplexity of the F32 GGUF against layerprune's own (torch, float32) on the same windows; and the
depth-20 (search) blocks dropped by llama.cpp's `llama-quantize --prune-layers` against our export, tensor by tensor;
and the models whose Q4_K_M / Q3_K_M imatrix point came out worse than without, again with a matrix from
--imatrix-samples windows (imatrix_samples_check). `--versus-previous REV` compares with an earlier run.

bench/results/frontier.json is written after every point; a rerun resumes (points there are kept, so
keep --windows as they were measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _models  # noqa: E402
from _results import write as _write  # noqa: E402

import layerprune as lp  # noqa: E402
from layerprune.evaluation.llamacpp import gguf_summary, speed  # noqa: E402
from layerprune.models.llamacpp import to_gguf  # noqa: E402
from layerprune.models.llamacpp_quant import sidecar  # noqa: E402
from layerprune.models.llamacpp_tools import VERSION  # noqa: E402

RESULTS = HERE / "results" / "frontier.json"
WORK = HERE / "work" / "frontier"
CALIB, HELDOUT, SEQLEN = "fixture:val", "fixture:test", 512
IMATRIX = {"samples": 8, "seqlen": 512}  # 4,096 tokens: llama-imatrix on f32 is minutes a window here
IQ_LOW = ("IQ3_M", "IQ3_XXS", "IQ2_M")  # llama.cpp's i-quants below 4 bits: with an importance matrix only
DENSE_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS")
GRIDS = {"reduced": ("Q4_K_M", "Q8_0"), "medium": ("Q4_K_M", "Q8_0", "Q3_K_M"),
         "full": ("Q4_K_M", "Q8_0", "Q3_K_M", "Q6_K")}  # fmt: skip
# uniform-20: not a point of the grid; the F32 engine check's standard-checkpoint width model
PRUNED = {"depth-10": ("depth", 0.1), "depth-20": ("depth", 0.2), "depth-30": ("depth", 0.3),
          "width-10": ("width", 0.1), "width-20": ("width", 0.2), "width-30": ("width", 0.3),
          "uniform-20": ("width-uniform", 0.2)}  # fmt: skip
KD = " kd"  # "<model> kd": the model after distillation (RECIPE)
RECIPE = {"data": "fixture:train", "seqlen": 128, "method": "full", "steps": 20, "batch_size": 4, "lr": 2e-4,
          "kd_topk": 64}  # fmt: skip
TEACHER_CACHE = HERE / "work" / "recover_kd" / "cache-k64"  # SmolLM2's top-64 over RECIPE's windows
REFERENCE = "dense Q4_K_M"
# the depth points llama-quantize --prune-layers re-makes: Q8_0, one type for every tensor (the files must
# be equal), and Q4_K_M, whose mix of types llama-quantize chooses by layer index and layer count
PRUNE_LAYERS = (("depth-20", "Q8_0"), ("depth-20", "Q4_K_M"))


MERGED = ("points", "engine_check", "prune_layers_check", "imatrix_samples_check")
_BASE: dict = {}  # MERGED's parts as this run last read or wrote them: what it changed since is its own


def _copy(doc: dict) -> dict:
    return json.loads(json.dumps({part: doc.get(part, {}) for part in MERGED}))


def load(path: Path) -> dict:
    doc = json.loads(path.read_text()) if path.exists() else {}
    _BASE.clear()
    _BASE.update(_copy(doc))
    return doc


def write(doc: dict, path: Path) -> dict:
    """The results written with what other runs of this bench wrote meanwhile (runs measure disjoint
    points side by side, `--only`, and time them): a three-way merge, field by field, under a lock. A
    field this run changed since it last read or wrote the file is this run's; every other field is the
    file's. Entries are updated in place (callers hold them)."""
    import fcntl

    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        for part in MERGED:
            mine, base, theirs = doc.setdefault(part, {}), _BASE.get(part, {}), disk.get(part, {})
            for key, entry in theirs.items():
                if key not in mine:
                    mine[key] = entry
                    continue
                old = base.get(key, {})
                if not (isinstance(mine[key], dict) and isinstance(entry, dict) and isinstance(old, dict)):
                    continue
                changed = {f: v for f, v in mine[key].items() if f not in old or old[f] != v}
                mine[key].clear()
                mine[key].update({**entry, **changed})
        out = _write(doc, path)
        _BASE.clear()
        _BASE.update(_copy(doc))
        return out


def machine() -> dict:
    """The CPU the figures come from (llama.cpp is built portable, AVX2, but speed ratios depend on the
    CPU, and a run compared with another, versus_previous, should say on what each ran)."""
    import os
    import platform

    info: dict = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}  # the last CPU's: they are alike
    flags = fields.get("flags", "").split()
    info.update(
        cpu=fields.get("model name"), simd=sorted(f for f in flags if f.startswith(("avx", "amx", "f16c")))
    )
    return info


def make_model(key: str, dense: str) -> Path:
    """The model's folder, planned, applied and exported once (kept)."""
    if key.endswith(KD):
        return make_kd(key.removesuffix(KD), dense)
    kind, target = PRUNED[key]
    if kind == "width":
        return _models.deploy_search(target, dense)[0]
    folder = WORK / key
    if (folder / "report.json").is_file():
        return folder
    lm = lp.load(dense, quiet=True)
    if kind == "depth":
        per_block = sum(p.numel() for p in lm.adapter.blocks[0].parameters())
        count = round(target * sum(p.numel() for p in lm.adapter.blocks.parameters()) / per_block)
        plan = _models.depth_search_plan(lm, count) or real_depth_plan(lm, count)
        if plan is None:
            cached = WORK / "depth_scores.json"  # one scoring for every target (minutes on a busy CPU)
            if cached.is_file():
                scores = lp.Scores.load(cached)
            else:
                calib = lp.calibration(lm, CALIB, samples=10, seqlen=128, kind="depth")
                scores = lp.score(lm, "ppl", calib, progress=False)
                scores.save(cached)
            plan = lp.plan(lm, scores, remove=count)
        report = lp.apply(lm, plan, None, progress=False)
    else:  # width-uniform: a standard checkpoint, every block alike
        calib = lp.calibration(lm, CALIB, samples=16, seqlen=512)
        plan = lp.plan(lm, width=target, calib=calib, progress=False, allocation="uniform")
        report = lp.apply(lm, plan, calib, progress=False)
    lp.export(lm, folder, plan, {"pruning": report}, overwrite=True)
    return folder


def make_kd(base: str, dense: str) -> Path:
    """`base` recovered by RECIPE (distillation from the teacher cache), once, into bench/work/models/. The
    teacher is named so that a missing cache is built (bench/recover.py builds the same one: the windows
    those 20 steps train on); where it exists, the teacher is never loaded."""
    source = make_model(base, dense)
    with _models._locked(f"{base}.kd") as folder:
        if not (folder / "report.json").is_file():
            from layerprune.recovery import load_training_data

            lm = lp.load(str(source), device="cpu", dtype="float32", quiet=True)
            data = load_training_data(lm, RECIPE["data"], RECIPE["seqlen"])
            record = lp.recover(lm, data, method=RECIPE["method"], steps=RECIPE["steps"],
                                batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], teacher_cache=str(TEACHER_CACHE),
                                kd_topk=RECIPE["kd_topk"], teacher=dense, progress=False)  # fmt: skip
            extra = {"recovery": {k: v for k, v in record.items() if k != "history"}, "source": str(source)}
            lp.export(lm, folder, None, extra, overwrite=True)
    return folder


def real_depth_plan(lm, count: int):
    """The blocks bench/real.py's `ppl` scoring chose for `count` blocks on this model, where it scored
    on the same calibration windows (fixture:val, 10 x 128, seed 0): the set this bench would find,
    without scoring 30 blocks again (a quarter hour on this busy CPU). None when real.json has no such set."""
    from layerprune.plans import DepthPlan
    from layerprune.scorers.run import model_info

    path = HERE / "results" / "real.json"
    if not path.is_file():
        return None
    real = json.loads(path.read_text())
    meta = real.get("protocol", {})
    row = real.get("depth", {}).get(f"ppl-{count}")
    same = meta.get("calibration_text") == CALIB and meta.get("sizes", {}).get("depth") == {
        "samples": 10,
        "seqlen": 128,
    }
    params = sum(p.numel() for p in lm.model.parameters())
    if not (row and same and meta.get("model") == "smollm2" and meta.get("parameters") == params):
        return None
    return DepthPlan(model=model_info(lm), method="ppl", remove=[str(b) for b in row["blocks"]],
                     params={"remove": count, "from": f"bench/results/real.json depth/ppl-{count}"})  # fmt: skip


def points(grid: str) -> list[tuple[str, str, bool]]:
    """(model, quant, imatrix) in measuring order: dense (the reference first); the 20 / 30 % models,
    pruned and recovered, at Q4_K_M and Q8_0, then the grid's other types; their imatrix pairs at
    Q4_K_M / Q3_K_M; the 10 % models likewise; the dense imatrix pairs; dense F16, IQ4_XS, IQ4_NL and
    the i-quants below 4 bits (with imatrix); the imatrix pairs of Q6_K, dense Q5_K_M and Q8_0 last."""
    low = [q for q in ("Q4_K_M", "Q3_K_M") if q in GRIDS[grid]]
    out = [("dense", q, False) for q in DENSE_QUANTS if q not in ("IQ4_XS", "F16")]

    def models(shares):  # pruned, then recovered; depth and width at each share
        return [f"{kind}-{share}{kd}" for kd in ("", KD) for kind in ("depth", "width") for share in shares]

    for shares in (("20", "30"), ("10",)):
        out += [(m, q, False) for q in GRIDS[grid] for m in models(shares)]
        out += [(m, q, True) for q in low for m in models(shares)]
    out += [("dense", q, True) for q in ("Q4_K_M", "Q3_K_M", "Q2_K")]
    out += [("dense", "F16", False), ("dense", "IQ4_XS", False), ("dense", "IQ4_NL", False)]
    out += [("dense", q, True) for q in IQ_LOW]
    # the imatrix pairs above 4 bits, last: Q6_K (llama-quantize uses the matrix there too) and dense
    # Q5_K_M; dense Q8_0, which it ignores (the same tensors: the ppl must come out equal)
    out += [(m, "Q6_K", True) for s in ("20", "30", "10") for m in models([s]) if "Q6_K" in GRIDS[grid]]
    out += [("dense", q, True) for q in ("Q6_K", "Q5_K_M", "Q8_0")]
    seen = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def name(model: str, quant: str, imatrix: bool) -> str:
    return f"{model} {quant}" + (" imatrix" if imatrix else "")


def gguf_path(model: str, quant: str, imatrix: bool, samples: int = IMATRIX["samples"]) -> Path:
    tag = (".imatrix" + ("" if samples == IMATRIX["samples"] else str(samples))) if imatrix else ""
    return WORK / "gguf" / f"{model.replace(' ', '.')}.{quant}{tag}.gguf"


def ensure_gguf(
    folder: Path, model: str, quant: str, imatrix: bool, threads: int, samples: int = IMATRIX["samples"]
) -> Path:
    """The point's file, exported by `layerprune export --quant` unless it is there (kept for speed);
    with imatrix, the matrix from `samples` windows of CALIB."""
    gguf = gguf_path(model, quant, imatrix, samples)
    if not gguf.is_file():
        lp.export_gguf(folder, gguf, quant=quant, imatrix=CALIB if imatrix else None, threads=threads,
                       imatrix_samples=samples, imatrix_seqlen=IMATRIX["seqlen"])  # fmt: skip
    return gguf


def file_facts(gguf: Path) -> dict:
    """The file's sha256 prefix (two runs can tell the same file from one of the same size) and the share
    of its weights in each tensor type (a K-quant's name on SmolLM2 is mostly fallback types)."""
    summary = gguf_summary(gguf)
    return {"fingerprint": summary["fingerprint"], "tensor_types": summary["tensor_types"]}


def measure_point(
    folder: Path,
    model: str,
    quant: str,
    imatrix: bool,
    windows: int,
    threads: int,
    samples: int = IMATRIX["samples"],
) -> dict:
    t0 = time.perf_counter()
    gguf = ensure_gguf(folder, model, quant, imatrix, threads, samples)
    export_s = time.perf_counter() - t0
    r = lp.perplexity_gguf(gguf, HELDOUT, seqlen=SEQLEN, max_windows=windows, threads=threads, progress=False)
    return {"model": model, "quant": quant, "imatrix": imatrix, "gguf": str(gguf.relative_to(HERE)),
            "bytes": gguf.stat().st_size, "heldout_ppl": r.ppl, "windows_fingerprint": r.protocol["fingerprint"],
            "export_seconds": export_s, "eval_seconds": r.seconds, **file_facts(gguf)}  # fmt: skip


def prune_layers_check(
    doc: dict, folders: dict, model: str, quant: str, windows: int, threads: int, evaluate: bool = True
) -> dict:
    """The depth model's blocks dropped by llama.cpp's own `llama-quantize --prune-layers` from the dense
    model's GGUF (stored type), against our export of the pruned folder at the same type: tensor by
    tensor (name, type, data), metadata (all but general.* and layerprune.*), and held-out perplexity
    on the same windows (ours: the frontier's point)."""
    import hashlib

    from gguf import GGUFReader

    from layerprune.checkpoint import read_record
    from layerprune.models.llamacpp import stored_outtype
    from layerprune.models.llamacpp_tools import find_tools, run_tool

    plan, _ = read_record(folders[model])
    layers = sorted(int(r) for r in plan.remove)  # whole blocks (the depth models here remove only those)
    ours = ensure_gguf(folders[model], model, quant, False, threads)
    base = WORK / "gguf" / "dense.base.gguf"
    if not base.is_file():
        to_gguf(folders["dense"], base, outtype=stored_outtype(folders["dense"]))
    theirs = WORK / "gguf" / f"{model}.{quant}.prune-layers.gguf"
    if not theirs.is_file():
        run_tool(find_tools(), "llama-quantize", ["--prune-layers", ",".join(map(str, layers)), str(base),
                 str(theirs), quant, str(threads)], "the dense GGUF")  # fmt: skip

    def read(path: Path) -> tuple[dict, dict]:
        r = GGUFReader(str(path))
        tensors = {
            t.name: (t.tensor_type.name, hashlib.sha256(bytes(t.data)).hexdigest()[:16]) for t in r.tensors
        }
        fields = {k: repr(f.contents()) for k, f in r.fields.items()
                  if not k.startswith(("general.", "layerprune.", "GGUF."))}  # fmt: skip
        return tensors, fields

    (ta, fa), (tb, fb) = read(ours), read(theirs)
    tensors_differing = sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))
    metadata_differing = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    point = doc["points"][name(model, quant, False)]
    if (tensors_differing or metadata_differing) and not evaluate:
        theirs_ppl, same = None, None
    elif tensors_differing or metadata_differing:
        r = lp.perplexity_gguf(theirs, HELDOUT, seqlen=SEQLEN, max_windows=windows, threads=threads,
                               tokenizer=str(folders[model]), progress=False)  # fmt: skip
        theirs_ppl, same = r.ppl, r.protocol["fingerprint"] == point["windows_fingerprint"]
    else:  # the same tensors, bit for bit, and the same hyperparameters: the same computation
        theirs_ppl, same = point["heldout_ppl"], True
    return {"model": model, "quant": quant, "pruned_layers": layers, "tensors": len(ta),
            "tensors_differing": tensors_differing, "metadata_differing": metadata_differing,
            "heldout_ppl": {"layerprune_export": point["heldout_ppl"], "llama_quantize_prune_layers": theirs_ppl},
            "ppl_by": ("llama.cpp" if evaluate else "not measured") if tensors_differing or metadata_differing
            else "same tensors and hyperparameters as ours",
            "ratio": theirs_ppl / point["heldout_ppl"] if theirs_ppl else None, "same_windows": same,
            "types_differing": {k: [ta[k][0], tb[k][0]] for k in tensors_differing if k in ta and k in tb},
            "bytes": {"layerprune_export": ours.stat().st_size, "llama_quantize_prune_layers": theirs.stat().st_size}}  # fmt: skip


def engine_check(folder: Path, model: str, windows: int, threads: int) -> dict:
    """llama.cpp's perplexity of the F32 GGUF against layerprune's own of the folder, same windows."""
    gguf = gguf_path(model, "F32", False)
    if not gguf.is_file():
        to_gguf(folder, gguf, outtype="f32")
    ours = lp.perplexity(
        lp.load(str(folder), quiet=True), HELDOUT, seqlen=SEQLEN, max_windows=windows, progress=False
    )
    theirs = lp.perplexity_gguf(gguf, HELDOUT, seqlen=SEQLEN, max_windows=windows, threads=threads,
                                tokenizer=str(folder), progress=False)  # fmt: skip
    gguf.unlink()  # 0.5 GB each; not a point of the frontier
    return {"layerprune_ppl": ours.ppl, "llama_cpp_ppl": theirs.ppl, "ratio": theirs.ppl / ours.ppl,
            "same_windows": ours.protocol["fingerprint"] == theirs.protocol["fingerprint"]}  # fmt: skip


def imatrix_samples_check(
    doc: dict, folders: dict, samples: int, windows: int, threads: int, path: Path
) -> None:
    """The models whose importance matrix made Q4_K_M or Q3_K_M worse than none, measured again at both
    types with a matrix from `samples` windows of the same text (IMATRIX's 8 x 512 is thin): was it the
    matrix's size? Entries "<point> <samples>", beside the grid's points (the grid keeps its protocol)."""
    pts, out = doc["points"], doc.setdefault("imatrix_samples_check", {})
    pairs = [(p, pts.get(name(p["model"], p["quant"], False))) for p in pts.values()]
    worse = sorted({p["model"] for p, plain in pairs if p["imatrix"] and p["quant"] in ("Q4_K_M", "Q3_K_M")
                    and plain and p["heldout_ppl"] > plain["heldout_ppl"]})  # fmt: skip
    for model in worse:
        for quant in ("Q4_K_M", "Q3_K_M"):
            key = f"{name(model, quant, True)} {samples}"
            if key in out or name(model, quant, True) not in pts:
                continue
            folders.setdefault(model, make_model(model, str(folders["dense"])))
            row = measure_point(folders[model], model, quant, True, windows, threads, samples)
            matrix = json.loads(sidecar(HERE / row["gguf"]).read_text())["quantization"]["imatrix"]
            out[key] = {**row, "imatrix_samples": samples, "imatrix_chunks": matrix["chunks"],
                        "ppl_without": pts[name(model, quant, False)]["heldout_ppl"],
                        f"ppl_with_{IMATRIX['samples']}": pts[name(model, quant, True)]["heldout_ppl"]}  # fmt: skip
            print(f"{key}: ppl {row['heldout_ppl']:.3f} (without {out[key]['ppl_without']:.3f})")
            write(doc, path)


def ensure_files(pts: dict, folders: dict, threads: int) -> None:
    """Every point's model folder and file, made again where gone (deterministic: the same bytes)."""
    for p in pts.values():
        if p["model"] not in folders:
            folders[p["model"]] = make_model(p["model"], str(folders["dense"]))
        ensure_gguf(folders[p["model"]], p["model"], p["quant"], p["imatrix"], threads)


def speed_rounds(doc: dict, folders: dict, rounds: int, repetitions: int, threads: int, path: Path) -> None:
    """llama-bench over every point, interleaved; ratios to dense Q4_K_M of the same round. A point's
    file that is gone is exported again first (the export is deterministic: same bytes)."""
    pts = doc["points"]
    ensure_files(pts, folders, threads)
    done = min((len(p.get("speed_runs", [])) for p in pts.values()), default=0)
    for _ in range(done, rounds):
        runs = {k: speed(HERE / p["gguf"], threads=threads, repetitions=repetitions) for k, p in pts.items()}
        ref = runs[REFERENCE]
        for k, r in runs.items():
            row = {m: r[f"{m}_tokens_per_s"] for m in ("pp128", "tg64")}
            row.update(
                {f"{m}_vs_ref": r[f"{m}_tokens_per_s"] / ref[f"{m}_tokens_per_s"] for m in ("pp128", "tg64")}
            )
            pts[k].setdefault("speed_runs", []).append(row)
        for p in pts.values():
            for m in ("pp128", "tg64"):
                p[f"{m}_tokens_per_s"] = statistics.median(r[m] for r in p["speed_runs"])
                p[f"{m}_vs_ref"] = statistics.median(r[f"{m}_vs_ref"] for r in p["speed_runs"])
        write(doc, path)


def cpu_speed(gguf: Path, prompt: int = 128, generate: int = 64) -> dict:
    """Tokens per CPU-second of one llama.cpp thread (the bindings, the library llama-bench links):
    a prompt of `prompt` tokens in one batch, then `generate` tokens one at a time (batch 1). CPU time,
    not wall time: on this shared machine a niced process waits most of its wall time (llama-bench's
    wall-clock tokens/s of one file varied 18-fold between rounds), and its own CPU time does not count
    the waiting. The ids are fixed and arbitrary (the cost of a token does not depend on which it is)."""
    from layerprune.models.llamacpp_tools import bindings, find_tools

    ids = [(1000 + 7919 * i) % 40000 for i in range(prompt + generate)]
    llm = bindings(find_tools()).Llama(model_path=str(gguf), n_ctx=prompt + generate, n_batch=prompt,
                                       n_threads=1, n_threads_batch=1, verbose=False)  # fmt: skip
    try:
        llm.eval(ids[:16])  # warm-up: first-touch of the weights, buffers
        llm.reset()
        t = time.process_time()
        llm.eval(ids[:prompt])
        pp = prompt / (time.process_time() - t)
        t = time.process_time()
        for tok in ids[prompt:]:
            llm.eval([tok])
        tg = generate / (time.process_time() - t)
    finally:
        llm.close()
    return {"pp128": pp, "tg64": tg}


def cpu_rounds(
    doc: dict, folders: dict, rounds: int, threads: int, path: Path, untimed: bool = False, wanted=None
) -> None:
    """cpu_speed over every point (of the `wanted` models), interleaved; ratios to dense Q4_K_M of the
    same round (medians). `untimed`: only the points with fewer than `rounds` rounds, beside the
    reference (rounds for the newcomers when a round of everything costs more than the machine has)."""
    pts = doc["points"]
    # an imatrix file runs as its twin (same types), where it has one (the i-quants below 4 bits exist only
    # with a matrix: timed themselves)
    timed = {k: p for k, p in pts.items() if (not p["imatrix"] or name(p["model"], p["quant"], False) not in pts)
             and (wanted is None or p["model"] in wanted or k == REFERENCE)}  # fmt: skip
    if untimed:
        timed = {k: p for k, p in timed.items() if k == REFERENCE or len(p.get("cpu_runs", [])) < rounds}
    ensure_files(timed, folders, threads)
    done = min((len(p.get("cpu_runs", [])) for p in timed.values()), default=0)
    for _ in range(done, rounds):
        runs = {k: cpu_speed(HERE / p["gguf"]) for k, p in timed.items()}
        ref = runs[REFERENCE]
        for k, r in runs.items():
            pts[k].setdefault("cpu_runs", []).append({**r, **{f"{m}_vs_ref": r[m] / ref[m] for m in r}})
        for p in timed.values():
            for m in ("pp128", "tg64"):
                p[f"{m}_cpu_tokens_per_s"] = statistics.median(r[m] for r in p["cpu_runs"])
                p[f"{m}_cpu_vs_ref"] = statistics.median(r[f"{m}_vs_ref"] for r in p["cpu_runs"])
        write(doc, path)
    for p in pts.values():
        twin = pts.get(name(p["model"], p["quant"], False))
        if p["imatrix"] and twin and "tg64_cpu_vs_ref" in twin:
            p.update(
                {k: v for k, v in twin.items() if "_cpu_" in k},
                speed_from=name(p["model"], p["quant"], False),
            )
    write(doc, path)


def versus_previous(doc: dict, old: dict, source: str) -> dict:
    """The points both runs measured on files of the same size (within 4 KiB: the metadata names the
    source folder), this run's figures over the other's: held-out perplexity and speed (x dense Q4_K_M)."""
    same = [(k, p, old["points"][k]) for k, p in doc["points"].items()
            if k in old.get("points", {}) and abs(old["points"][k].get("bytes", 0) - p["bytes"]) <= 4096]  # fmt: skip

    def spread(field: str) -> dict | None:
        r = sorted((p[field] / o[field], k) for k, p, o in same if field in p and field in o)
        if not r:
            return None
        return {"points": len(r), "median": statistics.median(v for v, _ in r), "min": r[0][0], "max": r[-1][0],
                "min_point": r[0][1], "max_point": r[-1][1]}  # fmt: skip

    hashed = [
        (p["fingerprint"], o["fingerprint"]) for _, p, o in same if "fingerprint" in p and "fingerprint" in o
    ]
    return {"source": source, "machine": old.get("protocol", {}).get("machine", "not recorded"),
            "files_compared": len(same), "files_hashed_both": len(hashed),
            "identical_files": sum(a == b for a, b in hashed), "heldout_ppl": spread("heldout_ppl"), "tg64_cpu_vs_ref": spread("tg64_cpu_vs_ref"),
            "pp128_cpu_vs_ref": spread("pp128_cpu_vs_ref")}  # fmt: skip


def pareto(pts: list[dict], x: str, lower_x: bool) -> list[dict]:
    """The points no other beats on both x and perplexity (x lower or higher is better)."""

    def beats(a, b):
        bx = a[x] <= b[x] if lower_x else a[x] >= b[x]
        strict = (a[x] != b[x]) or (a["heldout_ppl"] < b["heldout_ppl"])
        return bx and a["heldout_ppl"] <= b["heldout_ppl"] and strict

    front = [p for p in pts if not any(beats(q, p) for q in pts if q is not p)]
    return sorted(front, key=lambda p: p[x])


def answer(doc: dict) -> dict:
    """Which pruned points lie on each front, and the distance of the best pruned point to the front."""
    pts = [{"name": k, **p} for k, p in doc["points"].items()]
    out = {}
    for x, lower, what in (
        ("bytes", True, "bytes"),
        ("tg64_cpu_vs_ref", False, "generation tok/s (x dense Q4_K_M)"),
    ):
        have = [p for p in pts if x in p]
        if not have:
            continue
        front = pareto(have, x, lower)
        on = [p["name"] for p in front if p["model"] != "dense"]
        # distance: for each pruned point, the ppl of the best dense point at least as good on x, over its own
        gaps = []
        for p in have:
            if p["model"] == "dense":
                continue
            dense = [q for q in have if q["model"] == "dense" and (q[x] <= p[x] if lower else q[x] >= p[x])]
            if dense:
                best = min(dense, key=lambda q: q["heldout_ppl"])
                gaps.append(
                    {
                        "point": p["name"],
                        "dense": best["name"],
                        "ppl_ratio": p["heldout_ppl"] / best["heldout_ppl"],
                    }
                )
        out[what] = {"front": [p["name"] for p in front], "pruned_on_front": on,
                     "closest_pruned": min(gaps, key=lambda g: g["ppl_ratio"]) if gaps else None,
                     "pruned_on_front_vs_dense": [versus_dense(p, have, x, lower) for p in front
                                                  if p["model"] != "dense"]}  # fmt: skip
    return out


def versus_dense(p: dict, have: list[dict], x: str, lower: bool) -> dict:
    """A pruned point against the dense points: the best dense point at least as small / fast (its
    perplexity over the pruned point's: > 1 is what pruning gains at that budget); where no dense point
    is that small / fast, the nearest one on x, the best of those within 1 % of it (Q2_K and Q2_K with
    the importance matrix differ by a few hundred bytes): how much smaller / faster the pruned point is,
    and its perplexity ratio."""
    dense = [q for q in have if q["model"] == "dense"]
    if not dense:
        return {"point": p["name"], "dense": None, "relation": "no dense point measured"}
    within = [q for q in dense if (q[x] <= p[x] if lower else q[x] >= p[x])]
    if within:
        best = min(within, key=lambda q: q["heldout_ppl"])
        return {"point": p["name"], "dense": best["name"], "relation": "best dense point at least as good on x",
                "dense_ppl_over_pruned": best["heldout_ppl"] / p["heldout_ppl"], "x_ratio": p[x] / best[x]}  # fmt: skip
    edge = min(q[x] for q in dense) if lower else max(q[x] for q in dense)
    near = min((q for q in dense if (q[x] <= edge * 1.01 if lower else q[x] >= edge / 1.01)),
               key=lambda q: q["heldout_ppl"])  # fmt: skip
    return {"point": p["name"], "dense": near["name"], "relation": "no dense point is as good on x: the nearest",
            "dense_ppl_over_pruned": near["heldout_ppl"] / p["heldout_ppl"], "x_ratio": p[x] / near[x]}  # fmt: skip


def charts(doc: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts = [{"name": k, **p} for k, p in doc["points"].items()]
    colors = {"dense": "black", "depth-10": "tab:purple", "depth-20": "tab:blue", "depth-30": "tab:cyan",
              "width-10": "tab:pink", "width-20": "tab:red", "width-30": "tab:orange"}  # fmt: skip
    colors.update({m + KD: c for m, c in colors.items() if m != "dense"})
    made = []
    for x, lower, label, file in (
        ("bytes", True, "file size (MiB)", "frontier_bytes.png"),
        (
            "tg64_cpu_vs_ref",
            False,
            "generation tokens per CPU-second, batch 1, x dense Q4_K_M in the same round (1 thread)",
            "frontier_speed.png",
        ),
    ):
        have = [p for p in pts if x in p]
        if not have:
            continue
        scale = 2**20 if x == "bytes" else 1
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for model in colors:
            kd = model.endswith(KD)  # recovered: squares / diamonds; pruned only: circles / triangles
            for imat, marker in ((False, "s" if kd else "o"), (True, "D" if kd else "^")):
                sel = [p for p in have if p["model"] == model and p["imatrix"] == imat]
                if sel:
                    ax.scatter([p[x] / scale for p in sel], [p["heldout_ppl"] for p in sel], c=colors[model],
                               marker=marker, label=f"{model}{' +imatrix' if imat else ''}", zorder=3)  # fmt: skip
                for p in sel:
                    ax.annotate(p["quant"], (p[x] / scale, p["heldout_ppl"]), fontsize=6, xytext=(3, 2),
                                textcoords="offset points")  # fmt: skip
        front = pareto(have, x, lower)
        ax.step([p[x] / scale for p in front], [p["heldout_ppl"] for p in front], where="post" if lower else "pre",
                c="gray", ls="--", lw=1, label="Pareto front", zorder=2)  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel(f"held-out perplexity in llama.cpp ({HELDOUT}, seqlen {SEQLEN})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 20, 30, not 2 x 10^1
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title("SmolLM2-135M-Instruct: pruned × quantized (llama.cpp, CPU)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / file
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
        print(f"wrote {path}")
    return made


def markdown(doc: dict) -> str:
    """The docs page's tables from frontier.json: every point by size, the imatrix pairs, the checks,
    the answer, and the grid's points not measured."""
    ans = answer(doc)  # from the points, not a stored answer that may predate some
    fronts = {what: set(a["front"]) for what, a in ans.items()}
    pts = doc["points"]
    out = ["| point | MiB | held-out ppl (llama.cpp) | generation × dense Q4_K_M | prompt × dense Q4_K_M | "
           "on a front | tensor types (share of the weights) |", "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for key, p in sorted(pts.items(), key=lambda kv: kv[1]["bytes"]):
        on = ", ".join("size" if w == "bytes" else "speed" for w, f in fronts.items() if key in f)
        tg, pp = p.get("tg64_cpu_vs_ref"), p.get("pp128_cpu_vs_ref")
        types = (
            ", ".join(f"{k} {v:.0%}" for k, v in (p.get("tensor_types") or {}).items() if v >= 0.005) or "—"
        )
        out.append(f"| {key} | {p['bytes'] / 2**20:.1f} | {p['heldout_ppl']:.2f} | "
                   f"{f'{tg:.2f}' if tg else '—'} | {f'{pp:.2f}' if pp else '—'} | {on} | {types} |")  # fmt: skip
    pairs = [(k, pts[k], pts[f"{k} imatrix"]) for k in pts if f"{k} imatrix" in pts]
    if pairs:
        out += ["", "| point | ppl without imatrix | ppl with imatrix (fixture:val) | with / without |",
                "|---|---:|---:|---:|"]  # fmt: skip
        for key, without, with_ in pairs:
            out.append(f"| {key} | {without['heldout_ppl']:.2f} | {with_['heldout_ppl']:.2f} | "
                       f"{with_['heldout_ppl'] / without['heldout_ppl']:.3f} |")  # fmt: skip
    if doc.get("engine_check"):
        out += ["", "| model (F32 GGUF) | layerprune ppl | llama.cpp ppl | ratio | same windows |",
                "|---|---:|---:|---:|---|"]  # fmt: skip
        for key, c in doc["engine_check"].items():
            out.append(f"| {key} | {c['layerprune_ppl']:.4f} | {c['llama_cpp_ppl']:.4f} | {c['ratio']:.5f} | "
                       f"{'✓' if c['same_windows'] else '✗'} |")  # fmt: skip
    for key, c in (doc.get("prune_layers_check") or {}).items():
        ppl = c["heldout_ppl"]
        theirs = ppl["llama_quantize_prune_layers"]
        theirs_s = "not measured" if theirs is None else f"{theirs:.4f}"
        ratio_s = "—" if c.get("ratio") is None else f"{c['ratio']:.5f}"
        types = ", ".join(f"{k}: ours {a}, theirs {b}" for k, (a, b) in c.get("types_differing", {}).items())
        out += ["", "| llama-quantize --prune-layers | blocks dropped | tensors differing | metadata differing | "
                "ppl ours | ppl llama-quantize | ratio |", "|---|---|---:|---|---:|---:|---:|",
                f"| {key} | {', '.join(map(str, c['pruned_layers']))} | {len(c['tensors_differing'])} of "
                f"{c['tensors']} ({types}) | {', '.join(c['metadata_differing']) or 'none'} | "
                f"{ppl['layerprune_export']:.4f} | {theirs_s} | {ratio_s} |"]  # fmt: skip
    checks = doc.get("imatrix_samples_check") or {}
    if checks:
        n = IMATRIX["samples"]
        out += ["", f"| the matrix from more windows | ppl without | ppl, matrix of {n} × 512 | ppl, matrix of more | "
                "windows (kept) | with / without |", "|---|---:|---:|---:|---|---:|"]  # fmt: skip
        for c in checks.values():
            out.append(f"| {name(c['model'], c['quant'], True)} | {c['ppl_without']:.2f} | {c[f'ppl_with_{n}']:.2f} | "
                       f"{c['heldout_ppl']:.2f} | {c['imatrix_samples']} ({c['imatrix_chunks']}) | "
                       f"{c['heldout_ppl'] / c['ppl_without']:.3f} |")  # fmt: skip
    out.append("")
    for what, a in ans.items():
        close = a.get("closest_pruned")
        gap = (f"; the closest pruned point, {close['point']}, has {close['ppl_ratio']:.2f} × the perplexity of "
               f"{close['dense']}, the best dense point at least as small / fast" if close else "")  # fmt: skip
        out.append(f"- Front of ({what}, perplexity): {', '.join(a['front'])}. Pruned points on it: "
                   f"{', '.join(a['pruned_on_front']) or 'none'}{gap}.")  # fmt: skip
        unit = "size" if what == "bytes" else "speed"
        for v in a.get("pruned_on_front_vs_dense", []):
            if v["dense"] is None:
                continue
            out.append(f"  - {v['point']} against {v['dense']} ({v['relation'].replace('x', unit)}): "
                       f"{unit} × {v['x_ratio']:.2f}, dense perplexity / pruned {v['dense_ppl_over_pruned']:.2f}.")  # fmt: skip
    machine, prev = doc.get("protocol", {}).get("machine"), doc.get("versus_previous")
    if machine:
        simd = [
            f
            for f in ("avx2", "avx512f", "avx512_vnni", "avx512_fp16", "amx_int8")
            if f in machine.get("simd", [])
        ]
        out.append(f"- Machine: {machine.get('cpu')}, {machine['cores']} cores ({', '.join(simd) or 'no AVX2'}); "
                   "llama.cpp built portable (AVX2, not -march=native).")  # fmt: skip
    if prev and prev.get("heldout_ppl"):
        ppl, tg = prev["heldout_ppl"], prev.get("tg64_cpu_vs_ref")
        speed_s = (f"; generation × dense Q4_K_M {tg['min']:.2f}–{tg['max']:.2f} × the other's (median "
                   f"{tg['median']:.2f}, {tg['points']} points)" if tg else "")  # fmt: skip
        out.append(f"- The same files measured on another machine ({prev['source']}, CPU {prev['machine']}): "
                   f"held-out perplexity {ppl['min']:.4f}–{ppl['max']:.4f} × the other's (median {ppl['median']:.4f}, "
                   f"{ppl['points']} points){speed_s}.")  # fmt: skip
    grid = doc.get("protocol", {}).get("grid", "full")
    missing = [name(*p) for p in points(grid if grid in GRIDS else "full") if name(*p) not in pts]
    if missing:
        out.append(f"- Not measured yet ({grid} grid): {', '.join(missing)}.")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=tuple(GRIDS), default="full")
    p.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens (as measured: 4)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repetitions", type=int, default=2, help="llama-bench repetitions per round")
    p.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads (1: on a busy machine OpenMP threads spin)"
    )
    p.add_argument("--only", default=None, help="comma-separated model keys (dense, depth-20, ...)")
    p.add_argument(
        "--points", default=None, help="comma-separated point names ('dense Q4_K_M,width-20 Q8_0')"
    )
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--checks", default="engine,prune-layers,prune-layers-ppl,imatrix-samples",
                   help="which checks run (comma-separated; prune-layers-ppl: evaluate llama-quantize's file when it differs; "
                        "imatrix-samples: the pairs the matrix made worse, again with --imatrix-samples windows)")  # fmt: skip
    p.add_argument(
        "--imatrix-samples", type=int, default=32, help="windows of the imatrix-samples check's matrix"
    )
    p.add_argument("--engine-models", default="dense,depth-20,width-20,uniform-20",
                   help="the models whose F32 GGUF the engine check evaluates (dense, depth, DeciLM width, uniform width)")  # fmt: skip
    p.add_argument("--speed-untimed", action="store_true",
                   help="speed rounds only for the points with none yet, beside the reference")  # fmt: skip
    p.add_argument("--speed-by", choices=("cpu", "wall"), default="cpu",
                   help="cpu: tokens per CPU-second in the bindings (what a busy machine can measure); wall: llama-bench")  # fmt: skip
    p.add_argument("--no-check", action="store_true",
                   help="skip the checks: F32 llama.cpp vs layerprune, llama-quantize --prune-layers vs our export")  # fmt: skip
    p.add_argument(
        "--charts", action="store_true", help="charts and the answer from the results; measure nothing"
    )
    p.add_argument("--markdown", action="store_true", help="print the docs page's tables from the results")
    p.add_argument("--versus-previous", metavar="OLD.json", default=None,
                   help="compare with an earlier run's results (a file or a git revision; another machine): versus_previous; measure nothing")  # fmt: skip
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args()
    doc = load(args.output)
    if args.markdown:
        print(markdown(doc))
        return 0
    if args.versus_previous:  # a file, or a git revision of this one ("95d2192")
        src = args.versus_previous
        if Path(src).is_file():
            text = Path(src).read_text()
        else:
            import subprocess

            rel = RESULTS.relative_to(HERE.parent).as_posix()
            text = subprocess.run(["git", "show", f"{src}:{rel}"], cwd=HERE, capture_output=True, text=True,
                                  check=True).stdout  # fmt: skip
            src = f"git {src}:{rel}"
        doc["versus_previous"] = versus_previous(doc, json.loads(text), src)
        write(doc, args.output)
        print(json.dumps(doc["versus_previous"], indent=1))
        return 0
    if args.charts:
        doc["answer"] = answer(doc)
        write(doc, args.output)
        charts(doc, args.output.parent)
        print(json.dumps(doc["answer"], indent=1))
        return 0
    doc["benchmark"] = "prune or quantize: pruned x quantized SmolLM2-135M-Instruct in llama.cpp (CPU)"
    doc["protocol"] = {
        "heldout": {"dataset": HELDOUT, "seqlen": SEQLEN, "windows": args.windows, "engine": "llama.cpp (bindings)",
                    "kv_cache": "f32"},
        "imatrix": {"source": CALIB, **IMATRIX, "bos": "first"},
        "speed": {"cpu": {"engine": "llama.cpp (bindings)", "clock": "process CPU time", "prompt": 128, "generate": 64,
                          "threads": 1, "rounds": args.rounds, "reference": REFERENCE},
                  "wall": {"tool": "llama-bench", "prompt": 128, "generate": 64, "threads": args.threads,
                           "rounds": 2, "repetitions": 1, "reference": REFERENCE,
                           "note": "speed_runs: wall clock on the shared 2-core machine, niced; too noisy to use"}},
        "pruning": {"depth": "the depth search's blocks (search.json smollm2 depth-N-fit512) where it ran (6, 9), "
                             "else ppl scores on 10 x 128 fixture:val (3)",
                    "width": "deployable searched allocation, --deploy decilm, Wanda-sp 16 x 512 fixture:val, short "
                             f"search: population 30, {_models.SEARCH_ITERATIONS} generations (bench/_models.py)",
                    "recovery": {"models": "<model> kd", "distillation": f"teacher SmolLM2 cached top-{RECIPE['kd_topk']}",
                                 **RECIPE}},
        "grid": args.grid, "llama_cpp": VERSION, "machine": machine(),
    }  # fmt: skip
    doc.setdefault("points", {})
    doc.setdefault("engine_check", {})
    import torch

    torch.set_num_threads(args.threads)  # the CPU is shared: one thread for torch too (recovery, checks)
    WORK.mkdir(parents=True, exist_ok=True)
    dense = str(lp.load("smollm2", quiet=True).path)
    wanted = set(args.only.split(",")) if args.only else None
    folders = {"dense": Path(dense)}
    for model, quant, imatrix in points(args.grid):
        if wanted is not None and model not in wanted:
            continue
        key = name(model, quant, imatrix)
        if key in doc["points"] or (args.points and key not in args.points.split(",")):
            continue
        if model not in folders:
            folders[model] = make_model(model, dense)
        doc["points"][key] = measure_point(folders[model], model, quant, imatrix, args.windows, args.threads)
        print(
            f"{key}: ppl {doc['points'][key]['heldout_ppl']:.3f}, {doc['points'][key]['bytes'] / 2**20:.1f} MiB"
        )
        write(doc, args.output)
    unread = [p for p in doc["points"].values() if "fingerprint" not in p and (HERE / p["gguf"]).is_file()]
    for p in unread:  # points measured before file_facts was recorded: read their files
        p.update(file_facts(HERE / p["gguf"]))
    if unread:
        write(doc, args.output)
    checks = set() if args.no_check else set(args.checks.split(","))
    if "engine" in checks:
        for model in args.engine_models.split(","):
            if model not in doc["engine_check"]:
                if model not in folders:
                    folders[model] = make_model(model, dense)
                doc["engine_check"][model] = engine_check(folders[model], model, args.windows, args.threads)
                print(f"engine check {model}: {doc['engine_check'][model]}")
                write(doc, args.output)
    for model, quant in PRUNE_LAYERS if "prune-layers" in checks else ():
        key = name(model, quant, False)
        if key in doc["points"] and key not in doc.setdefault("prune_layers_check", {}):
            folders.setdefault(model, make_model(model, dense))
            doc["prune_layers_check"][key] = prune_layers_check(doc, folders, model, quant, args.windows, args.threads,
                                                                evaluate="prune-layers-ppl" in checks)  # fmt: skip
            print(f"llama-quantize --prune-layers {key}: {doc['prune_layers_check'][key]}")
            write(doc, args.output)
    if "imatrix-samples" in checks:
        imatrix_samples_check(doc, folders, args.imatrix_samples, args.windows, args.threads, args.output)
    if not args.no_speed and REFERENCE in doc["points"]:
        if args.speed_by == "wall":
            speed_rounds(doc, folders, args.rounds, args.repetitions, args.threads, args.output)
        else:
            cpu_rounds(doc, folders, args.rounds, args.threads, args.output, args.speed_untimed, wanted)
    doc["answer"] = answer(doc)
    write(doc, args.output)
    charts(doc, args.output.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
