"""Recover a pruned model: LoRA (peft) merged back into the weights, or continued pretraining of
every weight (`method="full"`, Shortened LLaMA's CPT), on the same data interface.

Defaults are Shortened LLaMA's LoRA recipe: rank 8, alpha 16, dropout 0.05 on every q, k, v, o, gate,
up, down projection, AdamW at lr 1e-4, linear decay after a warm-up (100 steps, at most 10% of the
run), gradient norm clipped at 1.

- Deterministic for a seed: example order is a seeded permutation per epoch, and a step's
  micro-batches are a function of its index alone.
- Checkpoints every `save_every` steps (trainable weights in safetensors, optimizer and scheduler
  state, RNG state, the loss curve) written atomically; a rerun with the same options resumes from the
  last one and ends with the same weights as an uninterrupted run.
- Sparse models keep their zeros: LoRA deltas are merged and the masks re-applied; in full training
  the masks are re-applied after every step. Width-pruned models keep their per-block shapes.
- bf16 / fp16 models train on fp32 master weights with fp32 optimizer state, fp16 with dynamic loss
  scaling (precision.py). A run whose loss stays non-finite, or whose weights end non-finite, stops
  with one line; nothing non-finite is checkpointed or merged.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LayerpruneError
from ..io import atomic_dir, atomic_write_json
from .data import TrainingData
from .precision import MODES, Precision

SPARSE_MODEL = 0.01  # block linears with at least this fraction of exact zeros are a sparse model
# A step with a non-finite loss or gradient is skipped. The loss of a healthy run is non-finite on
# no step at all, so a few in a row mean divergence (or inf / NaN weights); GradScaler halves its
# scale on each overflow, so gradients that stay non-finite for 24 steps overflow even unscaled.
BAD_LOSS_STEPS = 3
BAD_GRAD_STEPS = 24


@dataclass
class RecoveryConfig:
    method: str = "lora"  # lora | full
    steps: int | None = None  # optimizer steps; default: `epochs` passes over the data
    epochs: float = 2.0
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup: int = 100  # steps, capped at 10% of the run
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    seed: int = 0
    save_every: int = 100
    kd_temperature: float = 1.0  # distillation (a teacher given): KL at temperature T
    kd_mix: float = 0.0  # share of the LM loss mixed into the distillation loss (0: KD alone, Minitron)

    def check(self) -> None:
        if self.method not in ("lora", "full"):
            raise LayerpruneError(f"recovery method '{self.method}' is unknown; use lora or full")
        for name in ("batch_size", "grad_accum", "rank", "save_every"):
            if getattr(self, name) < 1:
                raise LayerpruneError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 0:
            raise LayerpruneError("--steps must be at least 0")
        if self.epochs <= 0 and self.steps is None:
            raise LayerpruneError("--epochs must be positive")
        if not 0 < self.lr < 1:
            raise LayerpruneError(f"--lr {self.lr} must be in (0, 1)")
        if not self.kd_temperature > 0:
            raise LayerpruneError(f"--kd-temperature {self.kd_temperature} must be positive")
        if not 0 <= self.kd_mix <= 1:
            raise LayerpruneError(f"--kd-mix {self.kd_mix} must be in [0, 1]")

    def total_steps(self, examples: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(examples / (self.batch_size * self.grad_accum))
        return max(1, math.ceil(per_epoch * self.epochs))


def lora_targets(lm) -> list[str]:
    """Full names of every linear layer of every block (q, k, v, o, gate, up, down or their fused
    forms), skipping parts that a depth plan replaced by no-ops."""
    wanted = set()
    for i in range(lm.adapter.num_blocks):
        for path in lm.adapter.spec.linears.values():
            try:
                wanted.add(id(_get(lm.adapter.blocks[i], path)))
            except AttributeError:
                continue  # a silenced part
    return [name for name, m in lm.model.named_modules() if id(m) in wanted]


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def zero_masks(lm) -> dict[str, torch.Tensor]:
    """Where the block linears hold exact zeros, if the model is sparse (else empty: nothing to keep)."""
    targets = set(lora_targets(lm))
    masks, zeros, total = {}, 0, 0
    for name, module in lm.model.named_modules():
        if name in targets:
            w = module.weight
            masks[name] = w == 0
            zeros += int(masks[name].sum())
            total += w.numel()
    return masks if total and zeros / total >= SPARSE_MODEL else {}


def _apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    if not masks:
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight.masked_fill_(mask, 0)


def _apply_masks_to(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, mask in pairs:
            tensor.masked_fill_(mask, 0)


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _micro_batches(step: int, cfg: RecoveryConfig, n: int) -> list[list[int]]:
    """The example indices of the micro-batches of optimizer step `step` (epochs wrap around)."""
    per_step = cfg.batch_size * cfg.grad_accum
    start = step * per_step
    indices, orders = [], {}
    for k in range(start, start + per_step):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = _order(n, cfg.seed, epoch)
        indices.append(int(orders[epoch][pos]))
    return [indices[j : j + cfg.batch_size] for j in range(0, per_step, cfg.batch_size)]


def used_examples(cfg: RecoveryConfig, n: int) -> list[int]:
    """The indices of the examples a run of `cfg` over `n` examples trains on, sorted, each once:
    what a teacher cache must hold (a short run over a large text sees a few of its windows)."""
    count = cfg.total_steps(n) * cfg.batch_size * cfg.grad_accum
    if count >= n:  # the first epoch's permutation reaches every example
        return list(range(n))
    return sorted(int(i) for i in _order(n, cfg.seed, 0)[:count])


def compute_dtype(lm) -> torch.dtype:
    return next(lm.model.parameters()).dtype


def run_key(
    lm, data: TrainingData, cfg: RecoveryConfig, mode: str = "master", teacher: dict | None = None
) -> str:
    """What a checkpoint must match to be resumed: the model, the data, every option but save_every,
    and the numerics: the compute dtype and how low precision is trained (a bf16 run's checkpoint is
    never resumed by an fp32 run). Not the device: a checkpoint written on a GPU resumes on a CPU
    (the same weights and state; the steps after it are then not bit-identical to the GPU's)."""
    options = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    dtype = compute_dtype(lm)
    numerics = {"dtype": str(dtype), "mode": mode if dtype in (torch.bfloat16, torch.float16) else "fp32"}
    doc = {"model": lm.fingerprint, "data": data.protocol, "options": options, "numerics": numerics}
    if teacher is not None:  # distillation: the teacher (or its cache) is part of the run
        doc["teacher"] = teacher
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recover(
    lm,
    data: TrainingData,
    cfg: RecoveryConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    mode: str = "master",
    teacher=None,
) -> dict:
    """Train `lm` in place on `data` and merge; return the record (loss curve, tokens, seconds).

    `stop_after` ends the run after that many steps without merging (for tests of resumption).
    `mode`: how full training keeps a bf16 / fp16 model's updates, master | autocast (precision.py).
    `teacher`: distillation (distill.py) from a loaded teacher beside the student, or a TeacherCache;
    the loss is then cfg.kd_mix of the LM loss and the rest the KL to the teacher."""
    cfg = cfg or RecoveryConfig()
    cfg.check()
    if mode not in MODES:
        raise LayerpruneError(f"precision mode '{mode}' is unknown; use {' or '.join(MODES)}")
    if len(data) == 0:
        raise LayerpruneError("the training data has no examples")
    total = cfg.total_steps(len(data))
    warmup = min(cfg.warmup, total // 10)
    key = run_key(lm, data, cfg, mode, teacher_identity(teacher))
    masks = zero_masks(lm)
    device = lm.device
    torch.manual_seed(cfg.seed)

    model, trainable = _prepare(lm, cfg)
    prec = Precision(model, trainable, compute_dtype(lm), device, cfg.method == "full", mode)
    optimizer = torch.optim.AdamW(
        [p for _, p in prec.params], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup))
    by_weight = {f"{name}.weight": m for name, m in masks.items()} if cfg.method == "full" else {}
    step_masks = [(p, by_weight[n]) for n, p in prec.params if n in by_weight]  # LoRA: masks at merge
    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "tokens": []}
    if teacher is not None:
        history.update(kd=[], lm=[])  # the two parts of the loss, logged apart
    start, tokens_seen, seconds, skipped, saved_on = 0, 0, 0.0, [], None
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").exists():
        start, tokens_seen, seconds, history, skipped, saved_on = _resume(
            ckpt, key, prec, optimizer, scheduler
        )
        prec.to_model()

    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else (lm.tokenizer.eos_token_id or 0)
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"recover ({cfg.method})", unit="step", disable=not progress)
    t_run = time.perf_counter()
    step, bad_loss, bad_grad = start, 0, 0
    try:
        while step < total and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            loss_sum, step_tokens, parts_sum = 0.0, 0, {"kd": 0.0, "lm": 0.0}
            for idx in _micro_batches(step, cfg, len(data)):
                batch = {k: v.to(device) for k, v in data.batch(idx, pad).items()}
                with prec.autocast():
                    if teacher is None:
                        loss = model(**batch, use_cache=False).loss
                    else:
                        loss, parts = _distillation_loss(model, teacher, batch, idx, cfg)
                        for k in parts_sum:
                            parts_sum[k] += parts[k] / cfg.grad_accum
                prec.backward(loss / cfg.grad_accum)
                loss_sum += float(loss.detach()) / cfg.grad_accum
                step_tokens += int(batch["attention_mask"].sum())
            history["lr"].append(scheduler.get_last_lr()[0])
            stepped = prec.step(optimizer, cfg.max_grad_norm)
            with warnings.catch_warnings():  # a skipped step still moves the schedule: steps are indices
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            _apply_masks_to(step_masks)  # on the tensors the optimizer updates (fp32 masters)
            prec.to_model()
            step += 1
            bad_loss = 0 if math.isfinite(loss_sum) else bad_loss + 1
            bad_grad = 0 if stepped else bad_grad + 1
            if not stepped:
                skipped.append(step)
            _check_finite_run(step, bad_loss, bad_grad, prec)
            tokens_seen += step_tokens
            seconds += time.perf_counter() - t0
            history["step"].append(step)
            history["loss"].append(loss_sum)
            if teacher is not None:
                history["kd"].append(parts_sum["kd"])
                history["lm"].append(parts_sum["lm"])
            history["tokens"].append(tokens_seen)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_seen / max(seconds, 1e-9):,.0f}")
            due = ckpt is not None and step % cfg.save_every == 0 and step < total and bad_loss == 0
            if due and _all_finite(prec.params):  # a checkpoint never holds what could not be merged
                state = {"step": step, "tokens": tokens_seen, "seconds": seconds, "skipped": skipped}
                _save(ckpt, key, state, history, prec, optimizer, scheduler)
    finally:
        bar.close()
        prec.finish()
    model.eval()
    if step < total:  # stopped early on request: leave the model as it is (tests of resumption)
        return {"steps": step, "total_steps": total, "history": history}
    _finish(lm, model, cfg, masks)
    if not _all_finite(lm.model.named_parameters()):
        raise LayerpruneError(
            f"recovery ended with non-finite weights in {prec.record()['dtype']} (overflow); nothing was "
            "written: lower --lr, or load the model in float32"
        )
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "method": cfg.method,
        "options": asdict(cfg),
        "data": data.protocol,
        "steps": total,
        "warmup_steps": warmup,
        "resumed_from_step": start or None,
        **({"resumed_from_device": saved_on} if saved_on and saved_on != str(device) else {}),
        "tokens": tokens_seen,
        "seconds": seconds,
        "seconds_this_run": time.perf_counter() - t_run,
        "trainable_parameters": sum(p.numel() for _, p in trainable),
        "sparsity_kept": bool(masks),
        "precision": {**prec.record(), "skipped_steps": skipped},
        **({"distillation": distillation_record(teacher, cfg)} if teacher is not None else {}),
        "history": history,
    }


def teacher_identity(teacher) -> dict | None:
    """What a checkpoint of a distillation run must match: the teacher live, or its cache's key."""
    from .distill import TeacherCache

    if teacher is None:
        return None
    if isinstance(teacher, TeacherCache):
        return {"cache": teacher.manifest["key"]}
    return {"teacher": teacher.fingerprint, "numerics": teacher.numerics_key}


def distillation_record(teacher, cfg: RecoveryConfig) -> dict:
    from .distill import TeacherCache

    loss = f"forward KL(teacher || student) at T={cfg.kd_temperature}" + (
        f", mixed with {cfg.kd_mix} x the LM loss" if cfg.kd_mix else ""
    )
    if isinstance(teacher, TeacherCache):
        m = teacher.manifest
        return {"teacher": m.get("teacher_name"), "teacher_fingerprint": m["key"]["teacher"], "loss": loss,
                "temperature": cfg.kd_temperature, "mix": cfg.kd_mix, "cache": str(teacher.path),
                "topk": m["key"]["k"]}  # fmt: skip
    return {"teacher": teacher.name, "teacher_fingerprint": teacher.fingerprint, "loss": loss,
            "temperature": cfg.kd_temperature, "mix": cfg.kd_mix, "cache": None, "topk": None}  # fmt: skip


def _distillation_loss(model, teacher, batch: dict, idx: list[int], cfg: RecoveryConfig):
    """The student's logits against the teacher's (run beside it, no grad) or its cached top-k."""
    from .distill import TeacherCache, kd_loss

    ids, attention = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    if isinstance(teacher, TeacherCache):
        target = teacher.batch(idx, ids.shape[1], ids.device)
    else:
        with torch.no_grad():
            target = teacher.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    return kd_loss(logits, batch["labels"], target, temperature=cfg.kd_temperature, mix=cfg.kd_mix)


def _check_finite_run(step: int, bad_loss: int, bad_grad: int, prec: Precision) -> None:
    dtype = prec.record()["dtype"]
    if bad_loss >= BAD_LOSS_STEPS:
        raise LayerpruneError(
            f"recovery stopped at step {step}: the loss was non-finite for {bad_loss} steps in a row "
            f"({dtype}; the run diverged or the model holds inf / NaN weights); nothing was written: "
            "lower --lr, or load the model in float32"
        )
    if bad_grad >= BAD_GRAD_STEPS:
        raise LayerpruneError(
            f"recovery stopped at step {step}: the gradients were non-finite for {bad_grad} steps in a "
            f"row ({dtype}); nothing was written: lower --lr, or load the model in float32"
        )


def _all_finite(named) -> bool:
    return all(bool(torch.isfinite(p).all()) for _, p in named)


def _prepare(lm, cfg: RecoveryConfig):
    """The model to train and its (name, parameter) trainable list."""
    if cfg.method == "full":
        for p in lm.model.parameters():
            p.requires_grad_(True)
        return lm.model, list(lm.model.named_parameters())
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise LayerpruneError("LoRA needs peft: pip install 'layerprune[recover]'") from None
    targets = lora_targets(lm)
    if not targets:
        raise LayerpruneError("the model has no linear layer to put LoRA on; use --full")
    conv1d = lm.adapter.spec.transposed_weights  # GPT-2's Conv1D stores (in, out)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=bool(conv1d),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft (0.21) reads transformers 5's deprecated `is_gradient_checkpointing`: a FutureWarning on every
        # recover that the user can do nothing about (neither calls it from their code)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(lm.model, config)
    return model, [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _finish(lm, model, cfg: RecoveryConfig, masks) -> None:
    """Merge LoRA into the weights, put the zeros of a sparse model back, freeze everything."""
    from ..models.adapter import ModelAdapter, Unit

    if cfg.method == "lora":
        merged = model.merge_and_unload()
        lm.model = merged
        removed = getattr(merged.config, "layerprune_removed_parts", None)
        lm.adapter = ModelAdapter(merged)
        if removed:
            lm.adapter.silence_parts([Unit.parse(u) for u in removed])
    _apply_masks(lm.model, masks)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    lm.model.eval()
    lm.modified()


# ---- checkpoints --------------------------------------------------------------------------------
def _save(ckpt: Path, key, state: dict, history, prec: Precision, optimizer, scheduler) -> None:
    """The tensors the optimizer updates (fp32 masters of a low-precision model: the model's weights
    are their rounding), optimizer, scheduler and loss-scaler state, and every RNG in use."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt, overwrite=True) as tmp:
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in prec.params}, str(tmp / "trainable.safetensors")
        )
        opt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        if prec.scaler is not None:
            opt["scaler"] = prec.scaler.state_dict()
        torch.save(opt, tmp / "optimizer.pt")
        save_file(_rng_states(prec.device), str(tmp / "rng.safetensors"))
        atomic_write_json(
            tmp / "state.json", {"key": key, **state, "device": str(prec.device), "history": history}
        )


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator, and every CUDA generator when training runs on CUDA (LoRA dropout draws
    its masks from the device's generator)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _resume(ckpt: Path, key, prec: Precision, optimizer, scheduler):
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("key") != key:
        raise LayerpruneError(
            f"{ckpt} holds a checkpoint of another recovery run (other model, data, options or dtype); "
            "rerun with the same options and dtype to resume, or delete that folder to start over"
        )
    weights = load_file(str(ckpt / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in prec.params:
            p.copy_(weights[name])
    # tensors saved on another device (a GPU run resumed on a CPU-only host) load on the CPU; the
    # optimizer moves its state to its parameters' device itself
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    if prec.scaler is not None and "scaler" in opt:
        prec.scaler.load_state_dict(opt["scaler"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda:{i}"] for i in range(sum(k.startswith("cuda:") for k in rng))]
    if cuda and prec.device.type == "cuda" and len(cuda) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return (
        state["step"],
        state["tokens"],
        state["seconds"],
        state["history"],
        state["skipped"],
        state["device"],
    )
