"""Perplexity = exp(token-mean NLL) over non-overlapping windows of the joined text.

Two conventions exist in the pruning literature and are not comparable: seqlen 128 (LLM-Pruner,
Shortened LLaMA, Cooperative Game) and seqlen 2048 (Wanda, SparseGPT, AlphaPruning, SLEB, ShortGPT).
The default is the model's context up to 2048. The result carries its whole protocol.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..data import Windows, check_seqlen, check_vocab, default_bos, eval_windows, load_text
from ..engine.vocab import rows_at_once, window_nll
from ..models.adapter import ModelAdapter


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # summed over all predicted tokens
    tokens: int
    seconds: float
    protocol: dict
    mask: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def default_seqlen(adapter: ModelAdapter) -> int:
    context = adapter.context_length
    return min(context, 2048) if context else 2048


@torch.no_grad()
def perplexity_of_windows(
    model,
    adapter: ModelAdapter,
    windows: Windows,
    batch_size: int = 8,
    mask: Sequence[int] | None = None,
    granularity: str = "block",
    progress: bool = True,
) -> PerplexityResult:
    """Stream the windows through the model (under a skip mask if given), batch by batch; with
    offloaded blocks, block by block (each block read once for all windows)."""
    device = model.get_input_embeddings().weight.device
    t0 = time.perf_counter()
    ids = windows.input_ids
    if adapter.offload is not None:
        from ..engine.masked import BlockRunner, evaluate_masks

        keep = [1] * len(adapter.units(granularity)) if mask is None else list(mask)
        nll = evaluate_masks(BlockRunner(model, adapter, ids, batch_size), [keep], granularity)[0]
    else:
        # The loss is taken a chunk of tokens at a time on the compute device (engine/vocab.py) and
        # summed there in float64: one transfer at the end, never [batch x seqlen x vocab] logits.
        total = torch.zeros((), dtype=torch.float64, device=device)
        ctx = adapter.skip(mask, granularity) if mask is not None else contextlib.nullcontext()
        with ctx:
            for batch in tqdm(
                ids.split(rows_at_once(adapter, batch_size)),
                desc="perplexity",
                unit="batch",
                disable=not progress,
                leave=False,
            ):
                total += window_nll(adapter, batch.to(device)).sum()
        nll = float(total)
    tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    return PerplexityResult(
        ppl=math.exp(nll / tokens),
        nll=nll,
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        protocol=dict(windows.protocol),
        mask=[int(b) for b in mask] if mask is not None else None,
    )


def perplexity(
    lm,
    source: str,
    seqlen: int | None = None,
    bos: str | None = None,
    max_windows: int | None = None,
    batch_size: int = 8,
    mask: Sequence[int] | None = None,
    granularity: str = "block",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a loaded model (`layerprune.load(...)`) on a text source (see layerprune.data)."""
    seqlen = default_seqlen(lm.adapter) if seqlen is None else seqlen
    check_seqlen(seqlen, lm.adapter.context_length)
    if mask is not None:
        lm.adapter.check_mask(mask, granularity)
    bos = bos or default_bos(lm.tokenizer, lm.adapter)
    windows = eval_windows(lm.tokenizer, load_text(source, "test"), seqlen, bos, max_windows)
    check_vocab(lm, windows.input_ids, source)
    return perplexity_of_windows(lm.model, lm.adapter, windows, batch_size, mask, granularity, progress)
