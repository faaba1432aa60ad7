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
    teacher=None,
    teacher_cache: str | Path | None = None,
    kd_topk: int | None = None,
    **options,
) -> dict:
    """Retrain a (pruned) loaded model in place on `data` and merge; return the training record.

    `data`: a text source (`fixture:train`, a .txt / .jsonl file or folder, a named corpus online), an
    Alpaca-format instruction .jsonl, `alpaca`, or TrainingData. `method`: lora | full. `options`:
    steps, epochs, batch_size, grad_accum, lr, warmup, weight_decay, max_grad_norm, rank, alpha,
    dropout, seed, save_every, kd_temperature, kd_mix (RecoveryConfig). `checkpoint_dir`: where
    checkpoints go; a rerun with the same options and dtype resumes from it. A bf16 / fp16 model
    trains on fp32 master weights and optimizer state (fp16 with loss scaling) and keeps its dtype;
    the record's `precision` says how (dtype, mode, loss scale, skipped steps).

    Distillation (distill.py): `teacher` (a loaded model or a MODEL name, loaded on the student's
    device and dtype) runs beside the student; with `teacher_cache` (a folder) it runs once over the
    windows this run trains on into a cache of its top-`kd_topk` log-probabilities, and training reads
    only the cache (an existing cache that holds those windows is used without loading the teacher)."""
    lm.adapter.require_in_memory("recovery training")
    from ..errors import LayerpruneError

    unknown = sorted(set(options) - set(RecoveryConfig.__dataclass_fields__) - {"stop_after"})
    if unknown:
        raise LayerpruneError(f"recovery does not take {', '.join(unknown)}; see RecoveryConfig")
    stop_after = options.pop("stop_after", None)
    cfg = RecoveryConfig(method=method, **options)
    cfg.check()
    if kd_topk is not None and kd_topk < 1:
        raise LayerpruneError(f"--kd-topk {kd_topk} must be at least 1")
    if (teacher_cache is not None or kd_topk is not None) and teacher is None and teacher_cache is None:
        raise LayerpruneError("--kd-topk needs --teacher-cache (and --teacher the first time)")
    if isinstance(data, str):
        data = load_training_data(lm, data, seqlen)
    if teacher is not None or teacher_cache is not None:
        from .distill import DEFAULT_TOPK, prepare_teacher
        from .train import used_examples

        # a cache holds the teacher's view of the windows this run trains on only (not all of the text)
        teacher = prepare_teacher(lm, teacher, data, cfg.kd_temperature, teacher_cache,
                                  kd_topk or DEFAULT_TOPK, progress=progress,
                                  examples=used_examples(cfg, len(data)))  # fmt: skip
    return train(
        lm,
        data,
        cfg,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        stop_after=stop_after,
        teacher=teacher,
    )


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
