"""Knowledge distillation from the dense model (Minitron's logit KD): the loss, and a teacher cache.

The loss is the forward KL(teacher || student) of the next-token distributions at temperature T,
on the positions the language-model loss uses (a label other than IGNORE on the next token),
multiplied by T^2 so that its gradients keep their size as T changes (Hinton et al.), and mixed
with the LM loss by `mix` (0: distillation alone, as Minitron):

    loss = (1 - mix) * T^2 * mean_t KL(q_t || p_t) + mix * LM

The teacher runs beside the student, or once beforehand into a cache of its top-k log-probabilities
per token plus the log of the mass left over (the "rest" bucket): the KL over the k + 1 buckets is
still a proper divergence (zero only when the student puts the same mass on each bucket), and equals
the full KL when k is the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LayerpruneError

IGNORE = -100
CACHE_FORMAT = "layerprune-teacher-cache/1"
SHARD_EXAMPLES = 256
# Measured (bench/recover.py --model smollm2, recover_kd.json): KD + full on SmolLM2 depth -9, held-out
# ppl against 28.17 with every logit of the live teacher: top-8 29.32 (1.041 x), top-64 28.56 (1.014 x),
# top-256 28.33 (1.006 x). 64 is the smallest k measured within 2 % of the live teacher; a cache holds
# 8 k + 4 bytes per token (516 B at 64, 2 KB at 256).
DEFAULT_TOPK = 64


@dataclass
class TopK:
    """The teacher's top-k next-token log-probabilities at temperature T, per position."""

    index: torch.Tensor  # (..., k) int64: the token ids
    logq: torch.Tensor  # (..., k) float32: their log-probabilities
    rest: torch.Tensor  # (...,) float32: log of the remaining mass (-inf when k is the vocabulary)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: positions t whose prediction (of token t+1) the LM loss counts."""
    return labels[:, 1:] != IGNORE


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopK:
    logq = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    top = logq.topk(min(k, logq.shape[-1]), dim=-1)
    if top.indices.shape[-1] == logq.shape[-1]:
        rest = torch.full(logq.shape[:-1], float("-inf"), device=logq.device)
    else:  # the complement's log-sum-exp: exact where 1 - sum(top) would cancel
        rest = torch.logsumexp(logq.scatter(-1, top.indices, float("-inf")), dim=-1)
    return TopK(top.indices, top.values, rest)


# Where the student holds less than this share of its mass outside the teacher's top k, its rest bucket is
# taken by a log-sum-exp over the complement (exact, a pass over the vocabulary for those rows only);
# elsewhere as log(1 - sum of the top-k probabilities), whose float32 error (~1e-6 absolute) is then at
# most ~1e-3 of the bucket.
_REST_EXACT_BELOW = 1e-3


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | TopK,
    *,
    temperature: float = 1.0,
    mix: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts: `teacher` is the teacher's logits (B, T, V) or its TopK of
    the student's positions (B, T - 1, k); `labels` the LM labels (B, T).

    The gradient with respect to the student's logits has a closed form, p - Q per position (p the
    student's softmax, Q the teacher's buckets spread over the student's tokens), so it is computed
    with the loss, in place in one buffer of the logits' size, and kept for the backward pass: no
    log-softmax, exp or scatter of the vocabulary's size is left for autograd. Measured (bench/kd_loss.py,
    (4, 128, 49152) fp32 logits, one CPU thread, forward + backward): from a top-64 cache 0.51 x the time
    of F.cross_entropy and 1.0 logits' size of peak memory above the inputs (cross-entropy 3.0, the same
    loss through autograd 2.3 x and 5.0); the live teacher 1.6 x and 3.0 (autograd 2.2 x and 5.0)."""
    loss, kd, lm = _KDLoss.apply(student_logits, labels, teacher, float(temperature), float(mix))
    return loss, {"kd": float(kd), "lm": float(lm)}


class _KDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, teacher, temperature, mix):
        with torch.autocast(logits.device.type, enabled=False):
            loss, kd, lm, grad = _value_and_grad(
                logits, labels, teacher, temperature, mix, ctx.needs_input_grad[0]
            )
        ctx.grad = grad
        ctx.mark_non_differentiable(kd, lm)
        return loss, kd, lm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_kd, _g_lm):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "kd_loss: backward through the same loss twice (retain_graph) is not supported"
            )
        return grad.mul_(g_loss.to(grad.dtype)), None, None, None, None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) of (B, T, V) tensors whose rows are contiguous, as batched dot products (no product
    tensor of their size)."""
    return torch.stack([torch.bmm(x.unsqueeze(1), y.unsqueeze(-1)).reshape(-1) for x, y in zip(a, b)])


def _logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension of (B, T, V), a few rows at a time (its temporary is one chunk's)."""
    rows = max(1, (1 << 24) // x.shape[-1])
    return torch.stack([torch.cat([torch.logsumexp(c, dim=-1) for c in e.split(rows)]) for e in x])


def _value_and_grad(logits, labels, teacher, t: float, mix: float, need_grad: bool):
    """(loss, kd, lm, d loss / d logits or None). Notation per position: z the student's logits / T,
    p = softmax(z), lse = logsumexp(z); for a TopK teacher the buckets are its k tokens K (q_K) and the
    rest r (q_r, the student's p_r = 1 - sum p_K). KL = sum_K q (log q - z + lse) + q_r (log q_r - log p_r);
    d KL / d z_j = p_j - q_j on K and p_j (1 - q_r / p_r) off K. For logits: KL(q || p) summed over the
    vocabulary, d KL / d z = sum(q) p - q (sum(q), not 1: a cache of the whole vocabulary trains exactly as
    the live teacher). The loss is (1 - mix) T^2 mean KL + mix mean CE, so d / d logits = (1 - mix) T
    dKL/dz + mix (softmax(logits) - onehot(label)), on the positions whose next token is a label."""
    mask = target_positions(labels)
    n = mask.sum().clamp(min=1)
    B, T, V = logits.shape
    s = logits[:, :-1]
    target = labels[:, 1:].clamp(min=0).unsqueeze(-1)
    s_label = s.gather(-1, target).squeeze(-1).float()
    buf = torch.empty((B, T, V), dtype=torch.float32, device=logits.device)  # p, then the gradient
    buf[:, -1].zero_()
    p = buf[:, :-1]
    p.copy_(s)
    if t != 1.0:
        p.div_(t)
    topk = isinstance(teacher, TopK)
    if topk:
        z_top = p.gather(-1, teacher.index)
    else:  # q and log q - log p in two buffers; the KL as dot products per row (no product tensor)
        logq = torch.log_softmax(teacher[:, :-1].float() / t if t != 1.0 else teacher[:, :-1].float(), dim=-1)
        q = logq.exp()
        q_sum = q.sum(-1)
        logq.sub_(p)  # log q - z, then + lse below: log(q / p) term by term
    top = p.amax(-1, keepdim=True)  # softmax(z) in place, and lse
    p.sub_(top).exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    lse = (total.log() + top).squeeze(-1)
    del top, total
    if topk:
        lp_top = z_top - lse.unsqueeze(-1)
    else:
        # not sum q log q - sum q z + lse: those are ~lse each and their difference small, so float32 would
        # lose the KL's last digits; clamped: 0 where q underflows to 0, not 0 * -inf
        logq.add_(lse.unsqueeze(-1)).clamp_(min=torch.finfo(logq.dtype).min)
        kl = _rowdot(q, logq)
        del logq
    if t == 1.0:
        lse1 = lse
    else:  # the LM loss's own log-sum-exp (a pass, for the logged value when mix is 0)
        lse1 = _logsumexp_rows(s.float())
    lm_rows = lse1 - s_label
    # c: the KL's share of the gradient, b: what multiplies p on top of it (the LM loss's p, at T = 1)
    c, b = (1 - mix) * t, (mix if t == 1.0 else 0.0)
    if topk:
        q_top = teacher.logq.exp()  # 0 where a position holds no entry (-inf): a term of 0, not 0 * inf
        kl = torch.where(q_top > 0, q_top * (teacher.logq - lp_top), torch.zeros_like(q_top)).sum(-1)
        p_top = lp_top.exp()
        if teacher.index.shape[-1] < V:
            q_rest = teacher.rest.exp()
            outside = -torch.expm1(torch.logsumexp(lp_top, dim=-1))  # the student's mass outside the top k
            lp_rest = torch.log(outside.clamp_min(torch.finfo(outside.dtype).tiny))
            exact = outside < _REST_EXACT_BELOW
            rows = None
            if bool(exact.any()):
                rows = s[exact].float() / t
                rows.scatter_(-1, teacher.index[exact], float("-inf"))
                lse_rest = torch.logsumexp(rows, dim=-1)
                lp_rest = lp_rest.masked_scatter(exact, lse_rest - lse[exact])
            kl = kl + torch.where(q_rest > 0, q_rest * (teacher.rest - lp_rest), torch.zeros_like(kl))
            if need_grad:
                ratio = torch.where(exact | (q_rest == 0), torch.zeros_like(q_rest), q_rest / lp_rest.exp())
                p.mul_((c * (1 - ratio) + b).unsqueeze(-1))
                if rows is not None:  # q_r p_j / p_r as exp(z_j - lse of the complement): no 0 / 0
                    rows.sub_(lse_rest.unsqueeze(-1)).exp_().mul_((c * q_rest[exact]).unsqueeze(-1))
                    p[exact] = p[exact] - rows
        elif need_grad:
            p.mul_(c + b)
        if need_grad:
            p.scatter_(-1, teacher.index, c * (p_top - q_top) + b * p_top)
    else:
        if need_grad:
            p.mul_((c * q_sum + b).unsqueeze(-1)).sub_(q, alpha=c)
        del q
    kd = torch.where(mask, kl, torch.zeros_like(kl)).sum() / n * t**2
    lm = torch.where(mask, lm_rows, torch.zeros_like(lm_rows)).sum() / n
    loss = (1 - mix) * kd + mix * lm if mix else kd.clone()  # its own tensor: kd is marked non-differentiable
    if not need_grad:
        return loss, kd, lm, None
    if mix and t != 1.0:  # the LM loss's softmax at T = 1, another pass
        p.add_(torch.softmax(s.float(), dim=-1), alpha=mix)
    if mix:
        p.scatter_add_(-1, target, torch.full_like(target, -mix, dtype=p.dtype))
    p.mul_((mask / n).unsqueeze(-1))
    grad = buf if logits.dtype == torch.float32 else buf.to(logits.dtype)
    return loss, kd, lm, grad


def tokenizer_id(tokenizer) -> str:
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def prepare_teacher(student, teacher, data, temperature: float, cache: str | Path | None, k: int,
                    progress: bool = True, examples: list[int] | None = None):  # fmt: skip
    """What training distils from: the loaded teacher (checked against the student), or a
    TeacherCache: an existing one checked against this run without loading the teacher, else one
    built now (the teacher is then dropped before training). `examples`: the indices of the
    examples training will use (None: all), all a cache must hold."""
    from ..models.loading import LoadedModel, load, resolve

    if cache is not None and (Path(cache) / "manifest.json").exists():
        c = TeacherCache(cache)
        want = {"data": cache_key("", data.protocol, k, temperature, "")["data"], "seqlen": data.protocol.get("seqlen"),
                "k": k, "temperature": temperature}  # fmt: skip
        c.check(want)
        c.check_holds(examples)
        if c.manifest.get("tokenizer") != tokenizer_id(student.tokenizer):
            raise LayerpruneError(
                f"teacher cache {c.path} was made with a teacher of another tokenizer than the student's; "
                "choose another --teacher-cache folder"
            )
        if isinstance(teacher, LoadedModel) and teacher.fingerprint != c.manifest["key"]["teacher"]:
            raise LayerpruneError(
                f"teacher cache {c.path} was made for another teacher ({c.manifest.get('teacher_name')}); "
                "choose another --teacher-cache folder"
            )
        if isinstance(teacher, str):
            folder = resolve(teacher, quiet=True)[1]
            made = c.manifest.get("teacher_source")
            if folder is not None and made is not None and str(folder.resolve()) != made:
                raise LayerpruneError(
                    f"teacher cache {c.path} was made for the teacher {c.manifest.get('teacher_name')}, not "
                    f"{teacher}; choose another --teacher-cache folder"
                )
        return c
    if teacher is None:
        raise LayerpruneError(
            "distillation needs --teacher MODEL (the dense model the student was pruned from)"
        )
    if not isinstance(teacher, LoadedModel):
        teacher = load(teacher, device=str(student.device), dtype=student.dtype, quiet=not progress)
    check_teacher(student, teacher)
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    if cache is None:
        return teacher
    return build_cache(
        teacher, data, cache, k=k, temperature=temperature, progress=progress, examples=examples
    )


def check_teacher(student, teacher) -> None:
    """One line before any work: a teacher of another vocabulary or tokenizer, or the student itself."""
    if teacher is student or teacher.model is student.model:
        raise LayerpruneError("the teacher is the student itself; pass the dense model with --teacher")
    vs, vt = student.model.config.vocab_size, teacher.model.config.vocab_size
    if vs != vt:
        raise LayerpruneError(
            f"the teacher {teacher.name} has a vocabulary of {vt} tokens, the student {vs}; "
            "distil from the model the student was pruned from (same tokenizer)"
        )
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise LayerpruneError(
            f"the teacher {teacher.name} tokenizes differently from the student; "
            "distil from the model the student was pruned from (same tokenizer)"
        )
    if teacher.fingerprint == student.fingerprint:
        raise LayerpruneError("the teacher is the student itself; pass the dense model with --teacher")


# ---- the teacher cache --------------------------------------------------------------------------
def cache_key(teacher_fp: str, data_protocol: dict, k: int, temperature: float, numerics: str) -> dict:
    """What a cache must match to be used: the teacher, the data (its examples and seqlen), k, T, and
    the precision the teacher ran in."""
    data_fp = hashlib.sha256(json.dumps(data_protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "teacher": teacher_fp,
        "data": data_fp,
        "seqlen": data_protocol.get("seqlen"),
        "k": k,
        "temperature": temperature,
        "numerics": numerics,
    }


class TeacherCache:
    """A folder of safetensors shards: per cached example, `index` (L, k) int32, `logq` (L, k) and
    `rest` (L,) float32 for every position of the example, L = the data's seqlen. The manifest's
    `cached` lists the examples held, in row order (absent: every example, row = index). Read a
    batch at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise LayerpruneError(
                f"{self.path} is not a teacher cache (no readable manifest.json); choose another --teacher-cache"
            ) from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise LayerpruneError(f"{self.path} is not a teacher cache ({CACHE_FORMAT})")
        self._files: dict[int, object] = {}
        cached = self.manifest.get("cached")
        cached = range(self.manifest["examples"]) if cached is None else cached
        self._row = {int(i): r for r, i in enumerate(cached)}

    def check_holds(self, examples: list[int] | None) -> None:
        """One line if this run trains on windows the cache does not hold (a cache made for a shorter
        run, another seed or batch size)."""
        want = range(self.manifest["examples"]) if examples is None else examples
        missing = sum(1 for i in want if i not in self._row)
        if missing:
            raise LayerpruneError(
                f"teacher cache {self.path} holds {len(self._row)} training windows but not {missing} of the "
                f"{len(want)} this run uses (made for fewer steps, or another --seed or batch size); "
                "choose another --teacher-cache folder"
            )

    def check(self, key: dict) -> None:
        have = self.manifest["key"]
        diff = [f"{n} {have.get(n)} (not {v})" for n, v in key.items() if have.get(n) != v]
        if diff:
            raise LayerpruneError(
                f"teacher cache {self.path} was made for another run: {', '.join(diff)}; "
                "choose another --teacher-cache folder"
            )

    def _shard(self, s: int):
        if s not in self._files:
            from safetensors import safe_open

            self._files[s] = safe_open(str(self.path / f"shard-{s:05d}.safetensors"), framework="pt")
        return self._files[s]

    def batch(self, indices: list[int], width: int, device) -> TopK:
        """The TopK of the student's positions 0 .. width-2 of these examples, stacked."""
        rows = {"index": [], "logq": [], "rest": []}
        for i in indices:
            r = self._row[i]
            f = self._shard(r // SHARD_EXAMPLES)
            j = r % SHARD_EXAMPLES
            for name in rows:
                rows[name].append(f.get_slice(name)[j : j + 1, : width - 1])
        index, logq, rest = (torch.cat(rows[n]) for n in ("index", "logq", "rest"))
        return TopK(index.to(device, torch.long), logq.to(device), rest.to(device))


@torch.no_grad()
def build_cache(teacher, data, path: str | Path, *, k: int, temperature: float, batch_size: int = 8,
                progress: bool = True, examples: list[int] | None = None) -> TeacherCache:  # fmt: skip
    """Run the teacher once over the examples training will use (`examples`, sorted indices; None:
    every example) and store its top-k; reused when it exists, matches and holds them."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..io import atomic_dir, atomic_write_json

    path = Path(path)
    key = cache_key(teacher.fingerprint, data.protocol, k, temperature, teacher.numerics_key)
    if (path / "manifest.json").exists():
        cache = TeacherCache(path)
        cache.check(key)
        cache.check_holds(examples)
        return cache
    if k > teacher.model.config.vocab_size:
        raise LayerpruneError(
            f"--kd-topk {k} exceeds the vocabulary ({teacher.model.config.vocab_size} tokens)"
        )
    seqlen = int(data.protocol.get("seqlen") or max(t.numel() for t in data.input_ids))
    pad = teacher.tokenizer.pad_token_id
    pad = pad if pad is not None else (teacher.tokenizer.eos_token_id or 0)
    teacher.model.eval()
    cached = list(range(len(data))) if examples is None else sorted(set(int(i) for i in examples))
    n = len(cached)
    bar = tqdm(total=n, desc="teacher cache", unit="example", disable=not progress)
    with atomic_dir(path, overwrite=path.exists()) as tmp:
        for s0 in range(0, n, SHARD_EXAMPLES):
            count = min(SHARD_EXAMPLES, n - s0)
            index = torch.zeros(count, seqlen, k, dtype=torch.int32)
            logq = torch.full((count, seqlen, k), float("-inf"))
            rest = torch.full((count, seqlen), float("-inf"))
            for b0 in range(0, count, batch_size):
                idx = cached[s0 + b0 : s0 + min(b0 + batch_size, count)]
                batch = {name: v.to(teacher.device) for name, v in data.batch(idx, pad).items()}
                logits = teacher.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                ).logits
                top = teacher_topk(logits, k, temperature)
                w = logits.shape[1]
                rows = slice(b0, b0 + len(idx))
                index[rows, :w] = top.index.to("cpu", torch.int32)
                logq[rows, :w] = top.logq.cpu()
                rest[rows, :w] = top.rest.cpu()
                bar.update(len(idx))
            save_file(
                {"index": index, "logq": logq, "rest": rest},
                str(tmp / f"shard-{s0 // SHARD_EXAMPLES:05d}.safetensors"),
            )
        atomic_write_json(
            tmp / "manifest.json",
            {
                "format": CACHE_FORMAT,
                "key": key,
                "examples": len(data),
                "cached": cached,
                "teacher_name": teacher.name,
                "teacher_source": str(teacher.path.resolve()) if teacher.path else None,
                "tokenizer": tokenizer_id(teacher.tokenizer),
            },  # fmt: skip
        )
    bar.close()
    return TeacherCache(path)
