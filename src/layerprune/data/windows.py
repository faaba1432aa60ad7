"""Token windows with a recorded protocol: evaluation windows (non-overlapping, the perplexity
protocol), calibration windows (random, the papers' samplers), and the calibration of a loaded model
with each paper's defaults. BOS policy: "none" (no BOS), "first" (BOS once, before the joined text —
what `tokenizer(text)` does for Llama-style tokenizers), "every" (each window starts with BOS; Gemma
needs it). The text sources are in text.py."""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import LayerpruneError
from .text import JOIN, Text, load_text

BOS_POLICIES = ("none", "first", "every")
_DOC_SAMPLING_CHARS = 20_000_000  # above this, calibration samples documents instead of tokenizing all


# ---- tokens ----------------------------------------------------------------------------------
def default_bos(tokenizer, adapter=None) -> str:
    """What the reference scripts do: BOS wherever `tokenizer(text)` puts one (Gemma: every window)."""
    if adapter is not None and adapter.default_bos == "every":
        return "every"
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return "none"
    ids = tokenizer("a")["input_ids"]
    return "first" if ids and ids[0] == bos else "none"


def encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a long text is expected here; it is cut into windows afterwards.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


# Whole texts tokenized in this process, newest last: one run evaluates and calibrates on the same text
# many times (recover's before/after, the demo's four models, a search's stages), and tokenizing a few
# hundred thousand tokens costs about a second each time. Keyed by the text's sha256 and the tokenizer's
# serialized state (a tokenizer given added tokens is another key); only texts up to _CACHED_CHARS.
_ENCODED: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
_CACHED_TEXTS, _CACHED_CHARS = 4, 4_000_000


def _tokenizer_key(tokenizer) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: their whole state as JSON
    if backend is None:
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{backend.to_str()}".encode()).hexdigest()


def encode_text(tokenizer, text: Text) -> Sequence[int]:
    """The token ids of a whole text (do not modify them: they may be shared)."""
    tok = _tokenizer_key(tokenizer) if len(text.text) <= _CACHED_CHARS else None
    if tok is None:
        return encode(tokenizer, text.text)
    key = (tok, text.sha256)
    hit = _ENCODED.get(key)
    if hit is None:
        hit = _ENCODED[key] = tuple(encode(tokenizer, text.text))
        while len(_ENCODED) > _CACHED_TEXTS:
            _ENCODED.popitem(last=False)
    _ENCODED.move_to_end(key)
    return hit


@dataclass
class Windows:
    """Token windows [n, seqlen] and the protocol that produced them."""

    input_ids: torch.Tensor
    protocol: dict

    @property
    def fingerprint(self) -> str:
        return self.protocol["fingerprint"]


def _bos_id(tokenizer, bos: str) -> int | None:
    if bos not in BOS_POLICIES:
        raise LayerpruneError(f"unknown BOS policy '{bos}'; use one of {', '.join(BOS_POLICIES)}")
    if bos == "none":
        return None
    if tokenizer.bos_token_id is None:
        raise LayerpruneError(f"this tokenizer has no BOS token; use --bos none instead of '{bos}'")
    return tokenizer.bos_token_id


def _finish(ids: torch.Tensor, protocol: dict) -> Windows:
    h = hashlib.sha256(ids.numpy().astype("int64").tobytes())
    h.update(json.dumps(protocol, sort_keys=True).encode())
    protocol["fingerprint"] = h.hexdigest()[:16]
    return Windows(ids, protocol)


def check_vocab(lm, ids: torch.Tensor, source: str) -> None:
    """Token ids the model has embeddings for: a tokenizer from another model (or one with added
    tokens the embeddings never got) is one line, not an IndexError deep inside the forward."""
    rows = lm.model.get_input_embeddings().num_embeddings
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise LayerpruneError(
            f"the tokenizer of {lm.name} gives token id {top} on {source}, but the model has {rows} embeddings: "
            "the folder's tokenizer does not belong to this model; save the model's own tokenizer with it"
        )


def check_seqlen(seqlen: int, context: int | None) -> None:
    if seqlen < 2:
        raise LayerpruneError(f"seqlen {seqlen} is too short; use at least 2 tokens")
    if context is not None and seqlen > context:
        raise LayerpruneError(
            f"seqlen {seqlen} exceeds the model's context of {context} tokens; use --seqlen {context} or less"
        )


def eval_windows(
    tokenizer, text: Text, seqlen: int, bos: str = "first", max_windows: int | None = None
) -> Windows:
    """Non-overlapping windows of the joined text. Every window predicts seqlen - 1 tokens."""
    bos_id = _bos_id(tokenizer, bos)
    ids = encode_text(tokenizer, text)
    if bos == "every":
        step = seqlen - 1
        n = len(ids) // step
        body = torch.tensor(ids[: n * step], dtype=torch.long).view(n, step)
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)
    else:
        if bos == "first":
            ids = (bos_id, *ids)
        n = len(ids) // seqlen
        windows = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)
    if n == 0:
        raise LayerpruneError(
            f"{text.name} has {len(ids)} tokens, fewer than one window of {seqlen}; use more text or a smaller --seqlen"
        )
    if max_windows is not None:
        windows = windows[:max_windows]
    protocol = {
        "dataset": text.name,
        "text_sha256": text.fingerprint,
        "seqlen": seqlen,
        "bos": bos,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.shape[0] * (seqlen - 1)),
        "join": JOIN,
        "kind": "eval",
    }
    return _finish(windows, protocol)


def calibration_windows(
    tokenizer, text: Text, n: int, seqlen: int, seed: int = 0, bos: str = "first"
) -> Windows:
    """n windows of seqlen tokens at seeded random offsets.

    Small sources are tokenized whole and windows drawn from the joined stream; large ones (C4) are
    sampled document by document, as Wanda and SparseGPT sample C4."""
    if n < 1:
        raise LayerpruneError(f"--samples must be at least 1, not {n}")
    bos_id = _bos_id(tokenizer, bos)
    # "first" and "every" coincide for independent samples: each is a sequence of its own.
    body_len = seqlen if bos_id is None else seqlen - 1
    rng = random.Random(seed)
    if sum(len(d) for d in text.documents) > _DOC_SAMPLING_CHARS:
        rows = []
        for _ in range(50 * n):
            doc = encode(tokenizer, text.documents[rng.randrange(len(text.documents))])
            if len(doc) > body_len:
                start = rng.randrange(len(doc) - body_len + 1)
                rows.append(doc[start : start + body_len])
                if len(rows) == n:
                    break
        if len(rows) < n:
            raise LayerpruneError(f"{text.name}: too few documents of {body_len}+ tokens for {n} samples")
    else:
        ids = encode_text(tokenizer, text)
        if len(ids) < n * body_len:
            raise LayerpruneError(
                f"{text.name} has {len(ids)} tokens; {n} samples x {body_len} tokens need {n * body_len}. "
                "Use more text, fewer --samples or a smaller --seqlen"
            )
        starts = [rng.randrange(len(ids) - body_len + 1) for _ in range(n)]
        rows = [list(ids[s : s + body_len]) for s in starts]
    windows = torch.tensor(rows, dtype=torch.long)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    protocol = {
        "dataset": text.name,
        "text_sha256": text.fingerprint,
        "samples": n,
        "seqlen": seqlen,
        "seed": seed,
        "bos": bos,
        "tokens": int(n * (seqlen - 1)),
        "kind": "calibration",
    }
    return _finish(windows, protocol)


# ---- calibration of a loaded model, with the papers' defaults ---------------------------------------
# Depth scoring: 10 samples x 128 tokens of BookCorpus (Shortened LLaMA, Cooperative Game).
# Sparsity (Wanda, SparseGPT, AlphaPruning, OWL): 128 samples x 2048 tokens of C4, seed 0, scaled down
# to the model's context for small models. The bundled fixture calibrates on its own validation text.
CALIBRATION_DEFAULTS = {
    "depth": {"source": "bookcorpus", "samples": 10, "seqlen": 128},
    "sparsity": {"source": "c4", "samples": 128, "seqlen": 2048},
    # structured (Wanda-sp) scores calibrate as Wanda does; the width search's fitness uses "depth"
    "width": {"source": "c4", "samples": 128, "seqlen": 2048},
}


def default_calibration_source(lm, kind: str = "depth") -> str:
    return "fixture:val" if lm.name == "fixture" else CALIBRATION_DEFAULTS[kind]["source"]


def calibration(
    lm,
    source: str | None = None,
    *,
    samples: int | None = None,
    seqlen: int | None = None,
    seed: int = 0,
    bos: str | None = None,
    kind: str = "depth",
) -> Windows:
    """Calibration windows for a loaded model; unset arguments take the defaults of `kind`'s papers."""
    if kind not in CALIBRATION_DEFAULTS:
        raise LayerpruneError(
            f"unknown calibration kind '{kind}'; use one of {', '.join(CALIBRATION_DEFAULTS)}"
        )
    d = CALIBRATION_DEFAULTS[kind]
    context = lm.adapter.context_length
    samples = d["samples"] if samples is None else samples
    if seqlen is None:
        seqlen = d["seqlen"] if context is None else min(d["seqlen"], context)
    check_seqlen(seqlen, context)
    text = load_text(source or default_calibration_source(lm, kind), default_split="train")
    windows = calibration_windows(
        lm.tokenizer, text, samples, seqlen, seed, bos or default_bos(lm.tokenizer, lm.adapter)
    )
    check_vocab(lm, windows.input_ids, text.name)
    return windows


def windows_from_protocol(lm, protocol: dict, source: str | None = None, what: str = "the plan") -> Windows:
    """The calibration windows a recorded protocol describes (or the same draw from `source`).

    Without `source` the text must be the one recorded: its fingerprint is checked, so that a plan or
    a scores file is never silently applied with other data."""
    windows = calibration_windows(
        lm.tokenizer,
        load_text(source or protocol["dataset"], "train"),
        protocol["samples"],
        protocol["seqlen"],
        protocol["seed"],
        protocol["bos"],
    )
    if source is None and windows.fingerprint != protocol["fingerprint"]:
        raise LayerpruneError(
            f"the calibration text of {what} ({protocol['dataset']}) changed since it was recorded; "
            "pass --calib SRC to use other text, or make it anew"
        )
    return windows


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration asked for but not drawn yet: unset fields take the defaults of the plan kind."""

    source: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    bos: str | None = None

    def windows(self, lm, kind: str) -> Windows:
        return calibration(
            lm, self.source, samples=self.samples, seqlen=self.seqlen, seed=self.seed, bos=self.bos, kind=kind
        )


def resolve_calibration(lm, calib: Windows | CalibrationSpec | str | None, kind: str) -> Windows:
    """Windows from whatever a verb was given: windows, a spec, a text source, or None (defaults)."""
    if isinstance(calib, Windows):
        return calib
    if isinstance(calib, str):
        calib = CalibrationSpec(calib)
    return (calib or CalibrationSpec()).windows(lm, kind)
