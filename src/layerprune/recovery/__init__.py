"""Recovery after pruning: LoRA (peft) merged back, or continued pretraining of every weight."""

from __future__ import annotations

from pathlib import Path

from .data import TrainingData, training_data
from .train import RecoveryConfig
from .train import recover as train

__all__ = ["recover", "RecoveryConfig", "TrainingData", "load_training_data", "training_data"]


def recover(
    lm,
    data: str | TrainingData,
    *,
    method: str = "lora",
    seqlen: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Retrain a (pruned) loaded model in place on `data` and merge; return the training record.

    `data`: a text source (`fixture:train`, a .txt / .jsonl file or folder, a named corpus online), an
    Alpaca-format instruction .jsonl, `alpaca`, or TrainingData. `method`: lora | full. `options`:
    steps, epochs, batch_size, grad_accum, lr, warmup, weight_decay, max_grad_norm, rank, alpha,
    dropout, seed, save_every (RecoveryConfig). `checkpoint_dir`: where checkpoints go; a rerun with
    the same options and dtype resumes from it. A bf16 / fp16 model trains on fp32 master weights
    and optimizer state (fp16 with loss scaling) and keeps its dtype; the record's `precision` says
    how (dtype, mode, loss scale, skipped steps)."""
    lm.adapter.require_in_memory("recovery training")
    from ..errors import LayerpruneError

    unknown = sorted(set(options) - set(RecoveryConfig.__dataclass_fields__) - {"stop_after"})
    if unknown:
        raise LayerpruneError(f"recovery does not take {', '.join(unknown)}; see RecoveryConfig")
    stop_after = options.pop("stop_after", None)
    cfg = RecoveryConfig(method=method, **options)
    cfg.check()
    if isinstance(data, str):
        data = load_training_data(lm, data, seqlen)
    return train(lm, data, cfg, checkpoint_dir=checkpoint_dir, progress=progress, stop_after=stop_after)


def load_training_data(lm, source: str, seqlen: int | None = None) -> TrainingData:
    """`source` as training examples for this model: `seqlen` defaults to min(256, context)."""
    import torch

    from ..data import check_seqlen, check_vocab

    context = lm.adapter.context_length
    seqlen = seqlen or min(256, context or 256)
    check_seqlen(seqlen, context)
    data = training_data(lm.tokenizer, source, seqlen)
    check_vocab(lm, torch.cat(data.input_ids) if len(data) else torch.empty(0), source)
    return data
