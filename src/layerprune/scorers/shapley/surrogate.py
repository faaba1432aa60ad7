"""A small network that predicts the utility of any layer mask from a few real evaluations.

Network = the reference's: Linear(L, 2L) -> CELU -> Linear(2L, 1) -> Sigmoid, MSE loss, SGD with
momentum 0.9 and a x0.1 step decay at 1/3 and 2/3 of training. `hidden` changes the width.

Schedules:
- "steps" (default): full-batch SGD, 3000 steps, at each of the learning rates 0.5, 0.2 and 0.1; the
  fit with the lowest *training* error is kept (the held-out masks are never looked at). The
  reference counts epochs of batch 300 (300 epochs, lr 0.008), which suits its thousands of masks;
  with a budget of a few hundred masks an epoch is a single step, 300 steps at lr 0.008 leave the
  network far from fitted (held-out R^2 0.05-0.2 on the bundled model) and the Shapley ranking
  follows the underfit, not the model. Counting steps instead gives R^2 ~0.99 at 128-256 masks.
  One learning rate is not enough on real LLMs: removing a vital block divides the utility by
  10^4, so utilities span six decades (SmolLM2-135M: 1e-6 ... 0.77, 40% of masks below 1e-3), and
  at lr 0.5 the sigmoid saturates at 0 for every mask (held-out R^2 -0.22, every contribution 0);
  lr 0.2 fits the same masks to R^2 0.94. tests/scorers/data/ keeps that game.
- "reference": the reference's epochs, batch and learning rate, exactly.
A held-out fraction of the masks measures the fit: R^2 and Spearman's rho (ties: mean ranks) on
masks it never saw.
Training is seeded and runs on CPU (a second or two); prediction is batched. Both run on one thread
(`one_thread`): a float reduction's order depends on the thread count, and torchrun gives each rank
one thread where a lone process has all cores, so a fit on "all threads" differed between the two
in the 12th digit. On one thread the fit and every prediction are the same bits in any process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import LayerpruneError


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside (a decorator too), the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SurrogateFit:
    model: nn.Module
    r2: float | None
    spearman: float | None
    train: int
    heldout: int
    heldout_index: torch.Tensor | None = None  # rows of the fitted masks that measured r2 / spearman
    lr: float | None = None  # the learning rate whose fit was kept

    @one_thread()
    @torch.no_grad()
    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        out = [self.model(chunk.float()).squeeze(-1).double() for chunk in masks.split(65536)]
        return torch.cat(out)


STEP_RATES = (0.5, 0.2, 0.1)  # the "steps" schedule's learning rates, tried in turn


def _train(X, y, train, L, hidden, lr, batch_size, epochs, seed, g) -> nn.Module:
    """One seeded run of SGD (momentum 0.9, x0.1 at 1/3 and 2/3 of training) on the rows `train`;
    `g` draws the batch order."""
    torch.manual_seed(seed)
    net = make_network(L, hidden)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.1)
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(perm), batch_size or len(perm)):
            idx = perm[i : i + (batch_size or len(perm))]
            loss = nn.functional.mse_loss(net(X[idx]).squeeze(-1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return net.eval()


def make_network(L: int, hidden: int | None = None) -> nn.Module:
    h = hidden or 2 * L
    return nn.Sequential(nn.Linear(L, h), nn.CELU(), nn.Linear(h, 1), nn.Sigmoid())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks, tied values sharing the mean of their
    ranks (scipy.stats.spearmanr). NaN where it is undefined, without a warning: fewer than two
    values, or either side constant (every rank tied); NaN inputs give NaN. Score files store NaN
    as null."""
    from scipy.stats import spearmanr  # imported here: scipy.stats costs a second at start-up

    x = a.detach().reshape(-1).double().cpu().numpy()
    y = b.detach().reshape(-1).double().cpu().numpy()
    if x.size < 2 or (x == x[0]).all() or (y == y[0]).all():
        return float("nan")
    return float(spearmanr(x, y).statistic)


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(1 - ((pred - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


@one_thread()
def fit_surrogate(
    masks: torch.Tensor,
    values: torch.Tensor,
    *,
    hidden: int | None = None,
    schedule: str = "steps",
    epochs: int | None = None,
    heldout: float = 0.2,
    seed: int = 0,
) -> SurrogateFit:
    """`epochs` counts passes over the training masks ("reference", default 300) or full-batch
    steps ("steps", default 3000)."""
    if schedule == "steps":
        batch_size, rates, epochs = None, STEP_RATES, epochs or 3000
    elif schedule == "reference":
        batch_size, rates, epochs = 300, (0.008,), epochs or 300
    else:
        raise LayerpruneError(f"unknown surrogate schedule '{schedule}'; use steps or reference")
    n, L = masks.shape
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    after_split = g.get_state()  # every learning rate sees the same batch order
    n_test = int(round(n * heldout)) if n >= 10 else 0
    test, train = order[:n_test], order[n_test:]
    X, y = masks.float(), values.float()
    best = None
    for lr in rates:
        g.set_state(after_split)
        net = _train(X, y, train, L, hidden, lr, batch_size, epochs, seed, g)
        with torch.no_grad():
            err = float(nn.functional.mse_loss(net(X[train]).squeeze(-1), y[train]))
        if best is None or err < best[0]:
            best = (err, lr, net)
    _, lr, net = best
    fit = SurrogateFit(net, None, None, len(train), n_test, test, lr=lr)
    if n_test >= 3:
        pred = fit(X[test]).float()
        fit.r2, fit.spearman = r_squared(pred, y[test]), spearman(pred, y[test])
    return fit
