"""KL divergence of a model's next-token distribution to the dense model's, on calibration windows:
the fitness of EvoPress's searches (KL(dense || compressed), summed over the vocabulary, averaged
over the predicted tokens; the last position of a window predicts nothing and is dropped).

The dense model's hidden states entering the output embedding are computed once and kept on the
compute device (windows x seqlen x hidden: a 128 K vocabulary's log-probabilities would be thousands
of times that); every candidate costs one forward, and both distributions are made from the shared
output embedding a chunk of tokens at a time (engine/vocab.py). The search changes block weights
only, never the output embedding, so the dense logits made from the dense hidden states are exactly
the dense model's.
"""

from __future__ import annotations

import torch

from ..engine.vocab import head_kl
from ..errors import LayerpruneError
from ..models.adapter import ModelAdapter


class DenseReference:
    @torch.no_grad()
    def __init__(self, model, adapter: ModelAdapter, input_ids: torch.Tensor, *, batch_size: int = 8):
        self.adapter, self.input_ids, self.batch_size = adapter, input_ids, batch_size
        self.device = model.get_input_embeddings().weight.device
        self.hidden = [self._hidden(b) for b in input_ids.split(batch_size)]

    def _hidden(self, batch: torch.Tensor) -> torch.Tensor:
        h = self.adapter.head_input(batch.to(self.device))
        if h is None:
            raise LayerpruneError(
                "the KL fitness needs the hidden states entering the model's output embedding, which "
                "this model does not expose; use --fitness nll"
            )
        return h

    def tokens(self, windows: int) -> int:
        return windows * (self.input_ids.shape[1] - 1)

    @torch.no_grad()
    def kl(self, model, windows: int | None = None) -> float:
        """Summed KL(dense || model) over the predicted tokens of the first `windows` windows; `model`
        is the adapter's model with its blocks changed."""
        if model is not self.adapter.model:
            raise ValueError("the KL reference was made for another model object")
        n = self.input_ids.shape[0] if windows is None else windows
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for b, lo in enumerate(range(0, n, self.batch_size)):
            hi = min(lo + self.batch_size, n)
            dense = self.hidden[b][: hi - lo]
            total += head_kl(self.adapter, dense, self._hidden(self.input_ids[lo:hi]))
        return float(total)
