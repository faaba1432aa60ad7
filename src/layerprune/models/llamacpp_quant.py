"""Quantized GGUF: llama.cpp's converter to the folder's own float type, then `llama-quantize` to the
asked type, optionally steered by an importance matrix that `llama-imatrix` computes on layerprune's
calibration windows.

The windows reach llama-imatrix as text, since it reads nothing else: each window's tokens after its
BOS are decoded on their own and the windows joined by the BOS token's text, which the tool parses
as the special token (--parse-special), so that no merge crosses a window's edge; the tool cuts
chunks of seqlen tokens, so chunk i is window i. (The windows therefore start with BOS even for a
model evaluated without one, as SmolLM2 is: one token of seqlen, the separator.) Whether llama.cpp's
tokenizer gives back exactly each window's token ids is checked before the tool runs (with llama.cpp's
own tokenizer, the function the tool calls). A window it does not give back is left out, and the
record names it: llama.cpp's and Hugging Face's tokenizers disagree on rare text (on SmolLM2, a
newline, spaces and a digit: HF 'ĊĠĠ' 'Ġ' '2', llama.cpp 'ĊĠĠĠ' '2'; about one window of 512 tokens
in five of fixture:val), and one such window would shift every chunk after it. Fewer than 2 windows
left is one line. The fingerprint of the ids llama-imatrix sees is recorded beside the windows' own.

The output is written beside its destination under a temporary name and renamed when complete; its
metadata carries `layerprune.*` keys (source, plan, quantization, imatrix windows) and a sidecar
`OUT.gguf.json` the whole record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import LayerpruneError
from ..io import atomic_write_json, publish, temp_dir_beside
from .llamacpp import check_gguf_output, stored_outtype, to_gguf
from .llamacpp_tools import Tools, bindings, find_tools, quant_types, run_tool

SIDECAR_SUFFIX = ".json"


def sidecar(gguf: str | Path) -> Path:
    return Path(str(gguf) + SIDECAR_SUFFIX)


def check_quant(quant: str, tools: Tools) -> str:
    """The type as llama-quantize names it; an unknown one is one line listing those it offers."""
    offered = quant_types(tools)
    for name in offered:
        if name.lower() == quant.lower():
            return name
    raise LayerpruneError(f"--quant {quant}: llama-quantize offers {', '.join(offered)}")


def ids_fingerprint(rows: list[list[int]]) -> str:
    """sha256 of token ids (int64, row after row), 16 hex digits: equal ids, equal fingerprints."""
    import numpy as np

    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def window_bodies(tokenizer, rows: list[list[int]]) -> tuple[str, list[str]]:
    """The BOS token's text and each window's text after its BOS, decoded on its own."""
    bos_id = tokenizer.bos_token_id
    bodies = []
    for row in rows:
        if bos_id is None or row[0] != bos_id:
            raise LayerpruneError(
                "--imatrix needs windows that start with BOS (their separator in llama-imatrix's text)"
            )
        bodies.append(
            tokenizer.decode(row[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )
    return tokenizer.convert_ids_to_tokens(bos_id), bodies


@contextmanager
def vocab_only(tools: Tools, gguf: Path):
    """llama.cpp's tokenizer of a GGUF (the model's vocabulary only, no weights)."""
    llm = bindings(tools).Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def window_ids(llm, texts: list[str]) -> list[list[int]]:
    """Each text as llama.cpp's tokenizer `llm` gives it (special tokens parsed, no BOS added: each
    text starts with the BOS token's own text)."""
    return [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]


def imatrix_input(llm, bos_text: str, bodies: list[str], seqlen: int) -> tuple[str, list[list[int]]]:
    """The text for llama-imatrix and the chunks it forms from it, as the tool does: llama.cpp's
    tokenization (common_tokenize: BOS added where the vocabulary says so, special tokens parsed),
    cut into rows of seqlen tokens, the first of each set to BOS where the vocabulary adds one."""
    add_bos = bool(llm.tokenize(b"", add_bos=True, special=True))
    text = ("" if add_bos else bos_text) + bos_text.join(bodies)
    ids = llm.tokenize(text.encode(), add_bos=True, special=True)
    bos = llm.token_bos()
    rows = [ids[i : i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
    return text, [[bos, *r[1:]] if add_bos else r for r in rows]


def tensor_types(gguf) -> dict[str, float]:
    """The share of the file's matrix elements (2-D tensors) in each GGML type, largest first (`gguf`: a
    path, or a GGUFReader already open on it). A type name is llama-quantize's recipe, not every
    tensor's type: K-quants (and most i-quants) need a matrix's input size in multiples of 256, and
    llama.cpp stores any other matrix in a fallback type."""
    from collections import Counter

    from gguf import GGUFReader

    reader = gguf if isinstance(gguf, GGUFReader) else GGUFReader(str(gguf))
    counts: Counter = Counter()
    for t in reader.tensors:
        if len(t.shape) >= 2:
            counts[t.tensor_type.name] += int(t.n_elements)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.most_common()} if total else {}


def fallback_note(quant: str, types: dict[str, float]) -> str | None:
    """One line when most of a K-quant / i-quant file is in other types (llama.cpp's fallback for
    matrices whose input size is not a multiple of 256), else None."""
    family = ("_K", "IQ")
    if not any(f in quant.upper() for f in family) or not types:
        return None
    covered = sum(v for k, v in types.items() if any(f in k for f in family))
    if covered >= 0.5:
        return None
    mix = ", ".join(f"{v:.0%} {k}" for k, v in types.items() if v >= 0.005)
    return (
        f"{quant} covers {covered:.0%} of the weights ({mix}): llama.cpp stores a matrix whose input size is "
        "not a multiple of 256 in a fallback type, so compare this file by its size, not its type's name"
    )


def compute_imatrix(
    tools: Tools, gguf: Path, tokenizer, windows, work: Path, threads: int
) -> tuple[Path, dict]:
    """llama-imatrix on the calibration windows (a layerprune Windows); the file and its record."""
    rows = windows.input_ids.tolist()
    seqlen = len(rows[0])
    if len(rows) < 2:
        raise LayerpruneError("--imatrix needs at least 2 calibration windows (llama-imatrix's minimum)")
    bos_text, bodies = window_bodies(tokenizer, rows)
    with vocab_only(tools, gguf) as llm:  # one load of the vocabulary for both tokenizations
        back = window_ids(llm, [bos_text + b for b in bodies])
        dropped = [i for i, (row, ids) in enumerate(zip(rows, back)) if row != ids]
        kept = [i for i in range(len(rows)) if i not in dropped]
        if len(kept) < 2:
            raise LayerpruneError(
                f"{len(dropped)} of {len(rows)} calibration windows do not tokenize back to the same ids in "
                "llama.cpp, and llama-imatrix needs 2; use another --imatrix source or a shorter --imatrix-seqlen"
            )
        text, seen = imatrix_input(llm, bos_text, [bodies[i] for i in kept], seqlen)
    if seen != [
        rows[i] for i in kept
    ]:  # each window gives itself back, so only a broken separator lands here
        raise LayerpruneError(
            "llama.cpp's tokenizer does not split the calibration text at the BOS token between windows; "
            "drop --imatrix for this model"
        )
    (work / "calib.txt").write_text(text + "\n", encoding="utf-8")  # -f drops one trailing newline
    out = work / "imatrix.gguf"
    args = ["-m", str(gguf), "-f", str(work / "calib.txt"), "--parse-special", "-c", str(seqlen), "-b", str(seqlen),
            "--chunks", str(len(rows)), "--no-ppl", "-o", str(out), "-t", str(threads)]  # fmt: skip
    run_tool(tools, "llama-imatrix", args, "the calibration windows")
    if not out.is_file():
        raise LayerpruneError(f"llama-imatrix wrote no {out.name}")
    record = {"windows": dict(windows.protocol), "ids_fingerprint": ids_fingerprint(rows),
              "llama_cpp_ids_fingerprint": ids_fingerprint(seen), "chunks": len(seen), "chunk_tokens": seqlen,
              "windows_left_out": dropped}  # fmt: skip
    return out, record


def imatrix_key(fingerprint: str, config: bytes, base_type: str, version: str, windows) -> str:
    """What an importance matrix depends on: the weights (layerprune's fingerprint), the config the
    converter reads, the GGUF type it was computed on, llama.cpp's version (its tokenizer decides which
    windows reach the tool) and the windows' token ids and length."""
    rows = windows.input_ids.tolist()
    parts = {"weights": fingerprint, "config": hashlib.sha256(config).hexdigest(), "base": base_type,
             "llama_cpp": version, "ids": ids_fingerprint(rows), "seqlen": len(rows[0])}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def imatrix_cache() -> Path:
    from ..io import cache_root

    return cache_root() / "imatrix"


def cached_imatrix(
    tools: Tools, base: Path, base_type: str, model_dir: Path, fingerprint, tokenizer, windows, work: Path,
    threads: int
) -> tuple[Path, dict]:  # fmt: skip
    """compute_imatrix's file and record, kept in `$LAYERPRUNE_CACHE/imatrix/KEY.*` (imatrix_key) and
    taken from there when the same weights, config, type, llama.cpp and windows come again (Q4_K_M and
    Q3_K_M of one model: one llama-imatrix run). Without the weights' fingerprint nothing is kept; a
    cache that cannot be written is passed by (the matrix is then only this export's)."""
    if not fingerprint:
        return compute_imatrix(tools, base, tokenizer, windows, work, threads)
    key = imatrix_key(
        fingerprint, (model_dir / "config.json").read_bytes(), base_type, tools.version, windows
    )
    folder = imatrix_cache()
    kept, kept_record = folder / f"{key}.gguf", folder / f"{key}.json"
    if kept.is_file() and kept_record.is_file():
        try:
            record = json.loads(kept_record.read_text())
        except (OSError, ValueError):
            record = None
        if record is not None:
            return kept, {**record, "reused": key}
    out, record = compute_imatrix(tools, base, tokenizer, windows, work, threads)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, work / "imatrix.kept")
        publish(work / "imatrix.kept")
        os.replace(work / "imatrix.kept", kept)  # the matrix first: a record names a whole file
        atomic_write_json(kept_record, record)
    except OSError:
        pass
    return out, record


def quantize(
    model_dir: str | Path,
    out: str | Path,
    quant: str,
    *,
    windows=None,
    tokenizer=None,
    record: dict | None = None,
    converter: str | Path | None = None,
    overwrite: bool = False,
    threads: int | None = None,
) -> dict:
    """A model folder as one quantized .gguf (`quant`: a llama-quantize type); with `windows` (and the
    model's `tokenizer`) an importance matrix from them steers it. The record written beside it."""
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
    tools = find_tools()
    quant = check_quant(quant, tools)
    check_gguf_output(model_dir, out, overwrite)
    threads = threads or min(os.cpu_count() or 2, 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = temp_dir_beside(out)  # the intermediate GGUF, the imatrix and the output until it is whole
    try:
        base_type = stored_outtype(model_dir)
        base = to_gguf(model_dir, work / f"base.{base_type}.gguf", outtype=base_type, converter=converter)
        doc = {
            **(record or {}),
            "source": str(model_dir.resolve()),
            "quantization": {"type": quant, "from": base_type, "llama_cpp": tools.version, "imatrix": None},
        }
        args = []
        if windows is not None:
            imatrix, doc["quantization"]["imatrix"] = cached_imatrix(
                tools,
                base,
                base_type,
                model_dir,
                doc.get("source_fingerprint"),
                tokenizer,
                windows,
                work,
                threads,
            )
            args += ["--imatrix", str(imatrix)]
        for key, value in _metadata(doc).items():
            args += ["--override-kv", f"{key}=str:{value}"]
        tmp = work / "out.gguf"
        run_tool(tools, "llama-quantize", [*args, str(base), str(tmp), quant, str(threads)], str(model_dir))
        doc["bytes"] = tmp.stat().st_size
        doc["tensor_types"] = tensor_types(tmp)
        atomic_write_json(sidecar(out), doc)
        publish(tmp)
        os.replace(tmp, out)
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _metadata(doc: dict) -> dict[str, str]:
    """The record's short facts as GGUF metadata (llama-quantize --override-kv: ≤ 127 characters each)."""
    q = doc["quantization"]
    plan = doc.get("plan")
    meta = {
        "layerprune.source": Path(doc["source"]).name,
        "layerprune.source_fingerprint": doc.get("source_fingerprint") or "",
        "layerprune.quantization": f"{q['type']} from {q['from']}",
        "layerprune.plan": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
        if plan
        else "dense",
    }
    if q["imatrix"]:
        w = q["imatrix"]["windows"]
        meta["layerprune.imatrix"] = (
            f"{w['dataset']} {w['samples']}x{w['seqlen']} seed {w['seed']} fingerprint {w['fingerprint']}"
        )
    return {k: v[:127] for k, v in meta.items() if v}
