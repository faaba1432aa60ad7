"""bf16 and fp16 against float32 on the bundled model, and the precision helpers (models/precision.py).

Tolerances (issue: bf16 / fp16 through every stage): perplexity within 0.5 % of float32's, the four
lowest ppl-scored blocks the same set, Wanda 50 % masks >= 99.5 % equal and the pruned perplexity within
1 %. The fixture's checkpoint is stored in bf16, so a bf16 load holds exactly float32's weights: what
differs is the arithmetic alone. And the selection and factorisation ops (kthvalue, sort, cholesky, svd,
histc) only ever see float32 (or float64) inputs: masks are chosen on float32 statistics whatever the
model computes in.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import layerprune as lp
from layerprune.errors import LayerpruneError
from layerprune.models import precision
from layerprune.models.precision import cpu_native_bf16, dtype_name, parse_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

LOW = (torch.bfloat16, torch.float16)
EVAL = {"seqlen": 128, "max_windows": 16}


# ---- names and detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype_names(name, dtype):
    assert parse_dtype(name) is dtype
    assert dtype_name(parse_dtype(name)) == str(dtype).split(".")[1]


def test_parse_dtype_auto_and_refusals():
    assert parse_dtype("auto") == "auto" and parse_dtype(None) == "auto" and dtype_name("auto") == "auto"
    for bad in ("float64", "int8", "half-ish", torch.float64):
        with pytest.raises(LayerpruneError) as e:
            parse_dtype(bad)
        msg = str(e.value)
        assert "\n" not in msg and all(c in msg for c in ("auto", "float32", "bfloat16", "float16"))


def test_dtype_names_import_without_torch():
    """The CLI's parser lists the choices without paying for torch."""
    code = "import sys, layerprune.models.precision as p; print('torch' in sys.modules, ','.join(p.DTYPE_CHOICES))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "auto,float32,fp32,bfloat16,bf16,float16,fp16"]


def test_cpuinfo_flags_parsed(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert precision._cpuinfo_flags(x86) == {"fpu", "sse", "avx512f", "avx512_bf16", "amx_tile"}
    assert precision._cpuinfo_flags(arm) == {"fp", "asimd", "bf16", "sve"}
    assert precision._cpuinfo_flags(tmp_path / "missing") == set()


def test_cpu_native_bf16_agrees_with_the_kernel(monkeypatch):
    """torch's capability query and the kernel's own flags (read here independently) agree."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None
    )
    if flags is None:
        pytest.skip("not an x86 /proc/cpuinfo")
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_native_bf16() is expected
    # without torch's query the /proc/cpuinfo fallback gives the same answer
    monkeypatch.setattr(precision, "_torch_flags", lambda: None)
    precision.cpu_native_bf16.cache_clear()
    try:
        assert precision.cpu_native_bf16() is expected
    finally:
        precision.cpu_native_bf16.cache_clear()


# ---- bf16 / fp16 track float32 on the bundled model ---------------------------------------------


def _run(dtype: torch.dtype) -> dict:
    """Perplexity, ppl-scored lowest blocks, Wanda 50 % masks and the pruned perplexity, in `dtype`."""
    lm = lp.load("fixture", device="cpu", dtype=dtype, quiet=True)
    assert next(lm.model.parameters()).dtype is dtype
    out = {"ppl": lp.perplexity(lm, "fixture:test", progress=False, **EVAL).ppl}
    scores = lp.score(lm, "ppl", lp.calibration(lm, "fixture:val", samples=10, seqlen=128), progress=False)
    imp = scores.importance
    out["lowest4"] = set(sorted(range(len(imp)), key=lambda j: imp[j])[:4])
    calib = lp.calibration(lm, "fixture:val", samples=16, seqlen=128)
    plan = lp.plan(lm, sparsity=0.5, pruner="wanda", calib=calib, progress=False)
    lp.apply(lm, plan, calib, progress=False)
    a = lm.adapter
    out["masks"] = {n: a.weight(a.layer(n)) == 0 for n in plan.layers}
    out["pruned_ppl"] = lp.perplexity(lm, "fixture:test", progress=False, **EVAL).ppl
    return out


@pytest.fixture(scope="module")
def fp32_run():
    return _run(torch.float32)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_name)
def test_low_precision_tracks_float32(dtype, fp32_run):
    ref, low = fp32_run, _run(dtype)
    assert abs(low["ppl"] / ref["ppl"] - 1) < 0.005, (low["ppl"], ref["ppl"])
    assert low["lowest4"] == ref["lowest4"]
    assert low["masks"].keys() == ref["masks"].keys() and len(ref["masks"]) == 12 * 7
    equal = sum(int((low["masks"][n] == ref["masks"][n]).sum()) for n in ref["masks"])
    total = sum(m.numel() for m in ref["masks"].values())
    assert equal / total >= 0.995, equal / total
    # the masks are Wanda's 50 %: half of every row (not a trivially equal all-False pair)
    assert all(abs(float(m.float().mean()) - 0.5) < 0.01 for m in low["masks"].values())
    assert abs(low["pruned_ppl"] / ref["pruned_ppl"] - 1) < 0.01, (low["pruned_ppl"], ref["pruned_ppl"])


# ---- selection and factorisation ops see float32 only -------------------------------------------

# every way these ops are reached from Python: the torch function and the Tensor method
WATCHED = {
    "kthvalue": (torch.kthvalue, torch.Tensor.kthvalue),
    "sort": (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort, torch.msort),
    "topk": (torch.topk, torch.Tensor.topk),
    "cholesky": (torch.linalg.cholesky, torch.cholesky, torch.Tensor.cholesky, torch.linalg.cholesky_ex),
    "cholesky_inverse": (torch.cholesky_inverse, torch.Tensor.cholesky_inverse),
    "svd": (torch.linalg.svd, torch.linalg.svdvals, torch.svd, torch.Tensor.svd),
    "histc": (torch.histc, torch.Tensor.histc),
}
FUNC_OP = {f: op for op, fs in WATCHED.items() for f in fs}


class OpDtypes(TorchFunctionMode):
    """Records the dtype of the tensor each watched op is given (its first argument)."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = FUNC_OP.get(func)
        if op is not None:
            x = args[0] if args else kwargs.get("input", kwargs.get("A"))
            self.seen[(op, x.dtype)] += 1
        return func(*args, **kwargs)


def test_op_recorder_sees_low_precision_calls():
    """The recorder itself: a bf16 kthvalue, a float16 sort and an int sort are seen as such."""
    with OpDtypes() as rec:
        torch.kthvalue(torch.rand(8, dtype=torch.bfloat16), 3)
        torch.rand(4, dtype=torch.float16).sort()
        torch.arange(4).argsort()
    assert rec.seen == {
        ("kthvalue", torch.bfloat16): 1,
        ("sort", torch.float16): 1,
        ("sort", torch.int64): 1,
    }


@pytest.mark.parametrize("dtype", LOW, ids=dtype_name)
def test_selection_ops_see_float32_only(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))  # the ESD metrics computed, not read from a cache
    lm = lp.load("fixture", device="cpu", dtype=dtype, quiet=True)
    calib = lp.calibration(lm, "fixture:val", samples=4, seqlen=64)
    with OpDtypes() as rec:
        lp.score(lm, "alpha", progress=False)  # ESD: svdvals, sort, histc
        for pruner, nm in (("magnitude", None), ("wanda", None), ("sparsegpt", None), ("sparsegpt", "2:4")):
            pruned = lp.load("fixture", device="cpu", dtype=dtype, quiet=True)
            kw = {"nm": nm} if nm else {}
            plan = lp.plan(pruned, sparsity=0.5, pruner=pruner, calib=calib, progress=False, **kw)
            lp.apply(pruned, plan, None if pruner == "magnitude" else calib, progress=False)
            assert next(pruned.model.parameters()).dtype is dtype
    ops = {op for op, _ in rec.seen}
    assert {"kthvalue", "sort", "cholesky", "cholesky_inverse", "svd", "histc"} <= ops, rec.seen
    low = {
        k: n
        for k, n in rec.seen.items()
        if k[1].is_floating_point and k[1] not in (torch.float32, torch.float64)
    }
    assert not low, f"selection / factorisation ops given low-precision inputs: {low}"
