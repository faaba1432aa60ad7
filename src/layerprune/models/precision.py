"""Which precision to compute in: the names a user gives, and whether this CPU does bf16 in hardware.

On a CPU with AVX512-BF16 (Cooper Lake, Sapphire Rapids and later Xeons; Zen 4 and later) or AMX-BF16
(Sapphire Rapids and later), oneDNN runs a bf16 matmul with native dot-product instructions: a linear of
SmolLM2's MLP shape ran 4.4x faster than float32 on our machine (159 against 36 GFLOP/s on 2 busy threads,
bench/precision.py); whole stages gain less (1.2-2.6x) and some lose. Without them, bf16 is emulated
(converted to float32 and back around every kernel) and runs many times slower than float32, which is
why float32 stays the CPU default there.

`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is not the question asked here: it is true on any
AVX512 CPU, emulated bf16 included.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LayerpruneError

if TYPE_CHECKING:
    import torch

# name -> canonical name (what records and messages use); plain strings, so that the CLI's parser can
# offer them without importing torch
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
CHOICES = "auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)"
# CPU flags (torch.cpu.get_capabilities() keys, the same words as /proc/cpuinfo) of native bf16 math
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | str:
    """'auto' (or None) stays "auto"; a name or a float32 / bfloat16 / float16 torch.dtype becomes that
    dtype; anything else is one line listing the choices."""
    import torch

    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        if str(value).removeprefix("torch.") in DTYPE_NAMES.values():
            return value
        raise LayerpruneError(f"dtype {str(value).replace('torch.', '')} is not supported; use {CHOICES}")
    name = str(value).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise LayerpruneError(f"unknown dtype '{value}'; use {CHOICES}")
    return getattr(torch, DTYPE_NAMES[name])


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a dtype ('bfloat16'), or 'auto'."""
    if isinstance(dtype, str):
        return "auto" if dtype.strip().lower() == "auto" else dtype_name(parse_dtype(dtype))
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """True when this CPU has AVX512-BF16 or AMX-BF16: bf16 matmuls run natively, faster than float32."""
    flags = _torch_flags()
    if flags is None:
        flags = _cpuinfo_flags()
    return any(f in flags for f in BF16_FLAGS)


def _torch_flags() -> set[str] | None:
    """The CPU's feature flags as torch's own cpuinfo sees them (torch >= 2.8), or None."""
    import torch

    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is not None:
        try:
            return {k for k, v in get().items() if v is True}
        except (RuntimeError, AttributeError):
            pass
    # older torch: the private per-feature queries (no amx_bf16 query there; amx_tile comes with it)
    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx_tile = getattr(cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is None and amx_tile is None:
        return None
    flags = set()
    if avx512_bf16 is not None and avx512_bf16():
        flags.add("avx512_bf16")
    if amx_tile is not None and amx_tile():
        flags.add("amx_bf16")
    return flags


def _cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return set(value.split())
    return set()
