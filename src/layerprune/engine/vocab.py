"""Losses over the vocabulary (next-token NLL, KL to a reference), a chunk of tokens at a time, on the
device the hidden states are on.

A batch's [windows x tokens x vocabulary] logits never exist at once: with a 128 K vocabulary, 8
windows of 2048 tokens are 8 GiB of float32 logits, and a log-softmax of them as much again. The model
runs up to its output embedding (`ModelAdapter.head_input`), and the embedding is applied to
`chunk_tokens(vocab)` tokens at a time, each chunk reduced to one number per token before the next
(the chunked cross-entropy of torchtune; Liger's fused linear cross-entropy is the kernel form).
Per-token values are float32 (as the logits are); their sums per window are float64.
"""

from __future__ import annotations

import torch

from ..models.adapter import ModelAdapter

# float32 logits of one chunk. A loss holds about three chunk-sized tensors at once (the logits, their
# shifted exponentials inside logsumexp; the KL: both models' log-probabilities and a product), so a
# chunk costs a few times this much, whatever the batch, the sequence length or the vocabulary.
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK = 1024  # tokens: enough rows for an efficient matmul with a small vocabulary


def chunk_tokens(vocab: int) -> int:
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // (4 * vocab)))


def _nll_chunk(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, without the [rows x vocab] log-softmax."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def head_nll(adapter: ModelAdapter, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window (float64, on hidden's device) from the hidden states entering
    the output embedding [B, T, H]; position t predicts input_ids[:, t + 1]."""
    B, T, H = hidden.shape
    x = hidden[:, :-1].reshape(-1, H)
    targets = input_ids[:, 1:].reshape(-1).to(x.device)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = chunk_tokens(adapter.vocab_size)
    for s in range(0, x.shape[0], step):
        out[s : s + step] = _nll_chunk(adapter.head_logits(x[s : s + step]), targets[s : s + step])
    return out.view(B, T - 1).sum(dim=1)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window (float64) from logits already made [B, T, V] (a model's own),
    reduced a chunk of tokens at a time: no float32 log-softmax copy of them."""
    B, T, V = logits.shape
    x = logits[:, :-1].reshape(-1, V)
    targets = input_ids[:, 1:].reshape(-1).to(x.device)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = chunk_tokens(V)
    for s in range(0, x.shape[0], step):
        out[s : s + step] = _nll_chunk(x[s : s + step], targets[s : s + step])
    return out.view(B, T - 1).sum(dim=1)


def window_nll(adapter: ModelAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window of the model as it is now (float64, on the compute device).
    A model whose forward cannot be stopped at its output embedding gives its own logits: these
    windows' [B, T, V] at once (callers then pass one window at a time, `rows_at_once`)."""
    hidden = adapter.head_input(input_ids)
    if hidden is None:
        logits = adapter.model(input_ids=input_ids, use_cache=False).logits
        return token_nll(logits, input_ids)
    return head_nll(adapter, hidden, input_ids)


def rows_at_once(adapter: ModelAdapter, batch_size: int) -> int:
    """The windows to give `window_nll` at once: one when it falls back to the model's logits."""
    return batch_size if adapter.head is not None else 1


def head_kl(adapter: ModelAdapter, reference: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Summed KL(reference || model) over the predicted tokens (float64 scalar, on hidden's device),
    from both models' hidden states entering the same output embedding [B, T, H]; the last position
    predicts nothing and is dropped."""
    H = hidden.shape[-1]
    p_in = reference[:, :-1].reshape(-1, H).to(hidden.device)
    q_in = hidden[:, :-1].reshape(-1, H)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    step = chunk_tokens(adapter.vocab_size)
    for s in range(0, q_in.shape[0], step):
        p = torch.log_softmax(adapter.head_logits(p_in[s : s + step]), dim=-1)
        q = torch.log_softmax(adapter.head_logits(q_in[s : s + step]), dim=-1)
        total += (p.exp() * (p - q)).sum(dtype=torch.float64)
    return total
