"""Measuring a GGUF file inside llama.cpp: perplexity on layerprune's own windows, speed in llama-bench.

Perplexity goes through llama-cpp-python's bindings (on the library `make llamacpp` built), not
`llama-perplexity`: the bindings take token ids, so llama.cpp computes on exactly the windows
layerprune evaluates (same ids, seqlen and BOS, one window per context, every position scored), where
llama-perplexity would tokenize the text itself and score only the second half of each chunk. The KV
cache is float32, so that the number is the file's, not the cache type's. The loss is summed in
float64 from llama.cpp's logits, as layerprune's own evaluation does.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..data import Windows
from ..errors import LayerpruneError
from ..models.llamacpp_tools import bindings, find_tools, run_tool
from .perplexity import PerplexityResult

GGML_TYPE_F32 = 0


def check_gguf(path: str | Path) -> Path:
    """A .gguf file; a folder (or anything else) is one line naming what --engine llama.cpp takes."""
    p = Path(path).expanduser()
    if not (p.is_file() and p.suffix.lower() == ".gguf"):
        raise LayerpruneError(
            f"--engine llama.cpp evaluates a .gguf file, and {path} is not one; write one with "
            f"`layerprune export {path} --gguf OUT.gguf [--quant Q4_K_M]`, or drop --engine"
        )
    return p


def context_length(gguf: Path) -> int | None:
    """{architecture}.context_length of a GGUF (None when absent)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    field = fields.get(f"{arch}.context_length")
    return int(field.parts[-1][0]) if field is not None else None


def perplexity_in_llamacpp(
    gguf: str | Path, windows: Windows, threads: int | None = None, progress: bool = True
) -> PerplexityResult:
    """exp(token-mean NLL) of the windows, every logit computed by llama.cpp on the GGUF."""
    import numpy as np
    from tqdm.auto import tqdm

    gguf = check_gguf(gguf)
    tools = find_tools()
    llama_cpp = bindings(tools)
    rows = windows.input_ids.tolist()
    seqlen = len(rows[0])
    threads = threads or min(os.cpu_count() or 2, 8)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                          verbose=False)  # fmt: skip
    nll = 0.0
    try:
        vocab, top = llm.n_vocab(), max(max(r) for r in rows)
        if top >= vocab:
            raise LayerpruneError(
                f"the windows hold token id {top}, but {gguf.name} has {vocab} tokens: the tokenizer is not this model's"
            )
        for row in tqdm(
            rows, desc="perplexity (llama.cpp)", unit="window", disable=not progress, leave=False
        ):
            llm.reset()
            llm.eval(row)
            logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
            top_ = logits.max(axis=-1, keepdims=True)
            lse = np.log(np.exp(logits - top_).sum(axis=-1)) + top_[:, 0]
            nll += float((lse - logits[np.arange(seqlen - 1), row[1:]]).sum())
    finally:
        llm.close()
    tokens = len(rows) * (seqlen - 1)
    protocol = {**windows.protocol, "engine": "llama.cpp", "llama_cpp": tools.version, "kv_cache": "f32",
                "threads": threads}  # fmt: skip
    return PerplexityResult(math.exp(nll / tokens), nll, tokens, time.perf_counter() - t0, protocol)


def speed(
    gguf: str | Path, threads: int | None = None, prompt: int = 128, generate: int = 64, repetitions: int = 3
) -> dict:
    """llama-bench's prompt-processing and generation tokens/s (its defaults otherwise: f16 KV cache)."""
    gguf = check_gguf(gguf)
    tools = find_tools()
    threads = threads or min(os.cpu_count() or 2, 8)
    args = ["-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(generate), "-r", str(repetitions),
            "-o", "json"]  # fmt: skip
    r = run_tool(tools, "llama-bench", args, gguf.name)
    out = {"tool": "llama-bench", "threads": threads, "repetitions": repetitions, "llama_cpp": tools.version}
    for rec in json.loads(r.stdout):
        key = f"pp{prompt}" if rec["n_prompt"] else f"tg{generate}"
        out[f"{key}_tokens_per_s"] = rec["avg_ts"]
        out[f"{key}_stddev"] = rec["stddev_ts"]
    return out


def file_type(gguf) -> str | None:
    """The file's type as llama.cpp names it (general.file_type: Q4_K_M, IQ3_XXS, F16, ...), or None
    (`gguf`: a path, or a GGUFReader already open on it)."""
    from gguf import GGUFReader, LlamaFileType

    reader = gguf if isinstance(gguf, GGUFReader) else GGUFReader(str(gguf))
    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    try:
        name = LlamaFileType(int(field.parts[-1][0])).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_summary(gguf: str | Path) -> dict:
    """What an eval record says of a GGUF file: bytes, sha256 prefix (its fingerprint), parameters
    (elements of its tensors), its type as llama.cpp names it (the recipe: Q4_K_M) and the share of
    its matrix elements in each tensor type (what the recipe gave this model's shapes), and the
    export's sidecar record if present."""
    import hashlib

    from gguf import GGUFReader

    from ..models.llamacpp_quant import sidecar, tensor_types

    gguf = check_gguf(gguf)
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    reader = GGUFReader(str(gguf))  # one reading of the header for the three facts below
    types = tensor_types(reader)
    side = sidecar(gguf)
    return {
        "bytes": gguf.stat().st_size,
        "fingerprint": h.hexdigest()[:16],
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
        "type": file_type(reader) or next(iter(types), None),
        "tensor_types": types,
        "record": json.loads(side.read_text()) if side.is_file() else None,
    }
