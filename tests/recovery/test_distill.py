"""The distillation loss and the teacher's top-k cache, against float64 computations by hand."""

from __future__ import annotations

import math

import pytest
import torch

from layerprune.recovery.distill import IGNORE, TopK, kd_loss, teacher_topk


def _softmax64(x: list[float], t: float) -> list[float]:
    m = max(v / t for v in x)
    e = [math.exp(v / t - m) for v in x]
    z = sum(e)
    return [v / z for v in e]


def _reference(student, teacher, labels, t, mix) -> float:
    """The loss by hand in float64 Python: explicit softmaxes, KL summed over the vocabulary, mean
    over the positions whose next token is a label, T^2, and the mixed-in cross-entropy at T = 1."""
    kls, ces = [], []
    B, T, _ = student.shape
    for b in range(B):
        for i in range(T - 1):
            if labels[b, i + 1] == IGNORE:
                continue
            s, te = student[b, i].double().tolist(), teacher[b, i].double().tolist()
            p, q = _softmax64(s, t), _softmax64(te, t)
            kls.append(sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q)))
            p1 = _softmax64(s, 1.0)
            ces.append(-math.log(p1[int(labels[b, i + 1])]))
    kd = t * t * sum(kls) / len(kls)
    lm = sum(ces) / len(ces)
    return (1 - mix) * kd + mix * lm


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("mix", [0.0, 0.3])
def test_kd_loss_equals_explicit_softmaxes_in_float64(t, mix):
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 6, 11
    student, teacher = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 3] = IGNORE  # a prompt token, and padding at the end of a row
    labels[1, 4:] = IGNORE
    loss, parts = kd_loss(student, labels, teacher, temperature=t, mix=mix)
    assert float(loss) == pytest.approx(_reference(student, teacher, labels, t, mix), rel=1e-5)
    # the full-vocabulary top-k is the same loss
    top = teacher_topk(teacher[:, :-1], V, t)
    assert float(kd_loss(student, labels, top, temperature=t, mix=mix)[0]) == pytest.approx(
        float(loss), rel=1e-5
    )


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    for teacher in (logits.clone(), teacher_topk(logits[:, :-1], 4, 1.0)):
        student = logits.clone().requires_grad_(True)
        loss, _ = kd_loss(student, labels, teacher)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-6
        assert float(student.grad.abs().max()) < 1e-6


def _kl_of_row(student: torch.Tensor, top: TopK) -> float:
    """kd_loss of one position: the student's logits (V,) before a next token that is a label."""
    logits = torch.stack([student, torch.zeros_like(student)]).unsqueeze(0)  # (1, 2, V)
    one = TopK(top.index.reshape(1, 1, -1), top.logq.reshape(1, 1, -1), top.rest.reshape(1, 1))
    return float(kd_loss(logits, torch.tensor([[0, 0]]), one)[0])


def test_topk_cache_by_hand():
    """Vocabulary of 4, k = 2: teacher q = (0.5, 0.3, 0.15, 0.05), student p = (0.25, 0.25, 0.25, 0.25).
    Buckets {0}, {1}, rest = {2, 3} with q_rest = 0.2, p_rest = 0.5:
    KL = 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5)."""
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    top = teacher_topk(q.log(), 2, 1.0)
    assert top.index.tolist() == [[0, 1]]
    assert top.rest.exp().item() == pytest.approx(0.2, rel=1e-6)
    kl = _kl_of_row(torch.zeros(4), top)
    expected = 0.5 * math.log(2) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert kl == pytest.approx(expected, rel=1e-6)
    # a proper divergence: 0 when the student matches every bucket, though not every token
    p = torch.tensor([0.5, 0.3, 0.02, 0.18])
    assert _kl_of_row(p.log(), top) == pytest.approx(0.0, abs=1e-6)


def test_positions_without_an_entry_contribute_nothing():
    """A cache row past an example's end holds -inf log-probabilities: no NaN in loss or gradient."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(1, 4, 6, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE]])
    top = teacher_topk(torch.randn(1, 3, 6, generator=g), 3, 1.0)
    top = TopK(top.index.clone(), top.logq.clone(), top.rest.clone())
    top.logq[0, 1:] = float("-inf")
    top.rest[0, 1:] = float("-inf")
    loss, _ = kd_loss(student, labels, top)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert float(student.grad[0, 1:].abs().max()) == 0.0


def _buckets_kl64(student: torch.Tensor, top: TopK) -> torch.Tensor:
    """KL over the k buckets and the rest by hand in float64: explicit softmax, the rest summed."""
    p = torch.softmax(student.double(), dim=-1)
    q_top, q_rest = top.logq.double().exp(), top.rest.double().exp()
    p_top = p.gather(-1, top.index)
    p_rest = p.sum(-1) - p_top.sum(-1)
    return (q_top * (q_top.log() - p_top.log())).sum(-1) + q_rest * (q_rest.log() - p_rest.log())


def test_the_rest_bucket_is_exact_where_the_student_leaves_almost_nothing_outside_the_top_k():
    """Rows whose student puts ~1e-11 of its mass outside the teacher's top 3 (where 1 - sum(top) is lost
    to float32 rounding) and rows with a wide rest: loss and gradient as the float64 computation's."""
    g = torch.Generator().manual_seed(4)
    V, k = 50, 3
    teacher = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    top = teacher_topk(teacher.float(), k, 1.0)
    student = torch.randn(2, 3, V, generator=g)
    peaked = student.clone()
    peaked.scatter_(-1, top.index, 30.0)  # the top 3 hold all but ~1e-11 of the mass
    student[0] = peaked[0]  # first example peaked, the second with a wide rest
    # kd_loss takes (B, T, V) logits and the top-k of positions 0..T-2: the 3 rows are positions 0..2
    x = torch.cat([student, torch.zeros(2, 1, V)], dim=1).requires_grad_(True)
    labels = torch.zeros(2, 4, dtype=torch.long)
    loss, _ = kd_loss(x, labels, top)
    x64 = student.double().requires_grad_(True)
    ref = _buckets_kl64(x64, top).mean()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    loss.backward()
    ref.backward()
    assert torch.allclose(x.grad[:, :3].double(), x64.grad, rtol=1e-3, atol=1e-7)
    assert float(x.grad[:, 3].abs().max()) == 0.0


def _reference64(student, teacher, labels, t, mix):
    """The loss in float64 autograd from explicit formulas: softmaxes, the KL over the vocabulary (logits)
    or over the k buckets and the rest (TopK), T^2, the masked mean, the mixed-in cross-entropy."""
    z = student[:, :-1].double()
    p = torch.softmax(z / t, dim=-1)
    if isinstance(teacher, TopK):
        q_top, q_rest = teacher.logq.double().exp(), teacher.rest.double().exp()
        p_top = p.gather(-1, teacher.index)
        p_rest = 1 - p_top.sum(-1)
        kl = torch.where(q_top > 0, q_top * (q_top.log() - p_top.log()), 0).sum(-1)
        if teacher.index.shape[-1] < z.shape[-1]:  # a rest bucket (else p_rest is 0 up to rounding)
            kl = kl + torch.where(q_rest > 0, q_rest * (q_rest.log() - p_rest.log()), 0)
    else:
        q = torch.softmax(teacher[:, :-1].double() / t, dim=-1)
        kl = (q * (q.log() - p.log())).sum(-1)
    mask = labels[:, 1:] != IGNORE
    ce = -torch.log_softmax(z, dim=-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    kd = t * t * (kl * mask).sum() / n
    return (1 - mix) * kd + mix * (ce * mask).sum() / n


@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("mix", [0.0, 0.3])
@pytest.mark.parametrize("k", [None, 4, 13])
def test_the_gradient_equals_float64_autograd_of_the_explicit_loss(t, mix, k):
    """d loss / d logits, computed with the loss in closed form, against float64 autograd; for the live
    teacher (k None), a top-k cache with a rest bucket (4 of 13) and the whole vocabulary (13)."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 5, 13
    student, teacher = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 3:] = IGNORE
    target = teacher if k is None else teacher_topk(teacher[:, :-1], k, t)
    x = student.clone().requires_grad_(True)
    loss, _ = kd_loss(x, labels, target, temperature=t, mix=mix)
    (loss * 3).backward()  # the upstream gradient scales it
    x64 = student.double().requires_grad_(True)
    ref = _reference64(x64, target, labels, t, mix)
    (ref * 3).backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_bf16_logits_get_a_bf16_gradient_close_to_float64():
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 5, 17, generator=g), torch.randn(2, 5, 17, generator=g)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    x = student.bfloat16().requires_grad_(True)
    loss, _ = kd_loss(x, labels, teacher_topk(teacher[:, :-1], 5), mix=0.5)
    loss.backward()
    x64 = student.bfloat16().double().requires_grad_(True)
    _reference64(x64, teacher_topk(teacher[:, :-1], 5), labels, 1.0, 0.5).backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.allclose(x.grad.double(), x64.grad, rtol=2e-2, atol=1e-4)
