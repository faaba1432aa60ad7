"""KL divergence of a model's next-token distribution to the dense model's, on calibration windows:
the fitness of EvoPress's searches (KL(dense || compressed), summed over the vocabulary, averaged
over the predicted tokens; the last position of a window predicts nothing and is dropped).

The dense log-probabilities are computed once and kept on the CPU, so every candidate costs one
forward; they take windows x (seqlen - 1) x vocabulary x 4 bytes, refused above `max_bytes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerpruneError

MAX_BYTES = 4 * 2**30


class DenseReference:
    @torch.no_grad()
    def __init__(self, model, input_ids: torch.Tensor, *, batch_size: int = 8, max_bytes: int = MAX_BYTES):
        vocab = model.get_output_embeddings().weight.shape[0]
        n, seqlen = input_ids.shape
        need = n * (seqlen - 1) * vocab * 4
        if need > max_bytes:
            raise LayerpruneError(
                f"the KL fitness would keep {need / 2**30:.1f} GiB of dense log-probabilities "
                f"({n} windows x {seqlen} tokens x {vocab}); use fewer --fitness-samples or a shorter "
                "--fitness-seqlen, or --fitness nll"
            )
        self.input_ids, self.batch_size = input_ids, batch_size
        self.logp = torch.cat([self._logp(model, b) for b in input_ids.split(batch_size)])

    @staticmethod
    def _logp(model, batch: torch.Tensor) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def tokens(self, windows: int) -> int:
        return windows * (self.input_ids.shape[1] - 1)

    @torch.no_grad()
    def kl(self, model, windows: int | None = None) -> float:
        """Summed KL(dense || model) over the predicted tokens of the first `windows` windows."""
        n = self.input_ids.shape[0] if windows is None else windows
        total = 0.0
        for lo in range(0, n, self.batch_size):
            hi = min(lo + self.batch_size, n)
            q = self._logp(model, self.input_ids[lo:hi])
            p = self.logp[lo:hi]
            total += float((p.exp() * (p - q)).sum(dtype=torch.float64))
        return total
