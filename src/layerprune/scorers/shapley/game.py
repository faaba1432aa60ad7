"""Values of a cooperative game over L players (here: blocks), without any model in sight.

A game is a batched utility `f(masks) -> values`, masks a [n, L] 0/1 tensor (1 = player present).
- `exact_shapley(table)`: exact Shapley values from all 2^L utilities, vectorised (L <= 16);
- `permutation_shapley(f, L, n)`: Monte-Carlo over random orders, each paired with its reverse
  (antithetic), every prefix of every order evaluated in one batch;
- `kernel_shap(f, L, n)`: KernelSHAP: coalitions drawn from the Shapley kernel (size s with weight
  (L-1)/(s(L-s)), then uniformly), each with its complement; least squares under the efficiency
  constraint sum(phi) = f(all) - f(none), solved exactly through its KKT system;
- `stratified_contributions(f, masks)`: the Cooperative Game paper's estimator, the mean of
  f(m with i) - f(m without i) over masks from the strata (a semivalue near the target ratio, not
  Shapley).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Game = Callable[[torch.Tensor], torch.Tensor]


def all_masks(L: int) -> torch.Tensor:
    """[2^L, L]: row r has bit i of r in column i."""
    r = torch.arange(2**L)
    return ((r[:, None] >> torch.arange(L)[None, :]) & 1).to(torch.float64)


def exact_shapley(table: torch.Tensor, L: int) -> torch.Tensor:
    """Exact Shapley values from v(S) for all S, `table[r]` = v(S) where bit i of r means i in S."""
    table = table.to(torch.float64)
    r = torch.arange(2**L)
    size = torch.zeros(2**L, dtype=torch.long)
    for i in range(L):
        size += (r >> i) & 1
    # weight of a coalition S (not containing i) of size s: s! (L-s-1)! / L!
    w = torch.tensor(
        [math.factorial(s) * math.factorial(L - s - 1) / math.factorial(L) for s in range(L)],
        dtype=torch.float64,
    )
    phi = torch.empty(L, dtype=torch.float64)
    for i in range(L):
        without = r[((r >> i) & 1) == 0]
        phi[i] = (w[size[without]] * (table[without | (1 << i)] - table[without])).sum()
    return phi


def permutation_shapley(
    f: Game, L: int, permutations: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shapley values by antithetic permutation sampling (`permutations` rounded up to even)."""
    half = max(1, (permutations + 1) // 2)
    orders = torch.stack([torch.randperm(L, generator=generator) for _ in range(half)])
    orders = torch.cat([orders, orders.flip(1)])  # each order with its reverse
    P = orders.shape[0]
    onehot = torch.zeros(P, L, L, dtype=torch.float64)
    onehot.scatter_(2, orders[:, :, None], 1.0)  # onehot[p, k] = player added at step k
    prefixes = torch.cat([torch.zeros(P, 1, L, dtype=torch.float64), onehot.cumsum(1)], dim=1)  # [P, L+1, L]
    values = f(prefixes.reshape(-1, L)).reshape(P, L + 1).to(torch.float64)
    marginal = values[:, 1:] - values[:, :-1]  # contribution of orders[p, k]
    phi = torch.zeros(L, dtype=torch.float64)
    phi.scatter_add_(0, orders.reshape(-1), marginal.reshape(-1))
    return phi / P


def kernel_coalitions(L: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n coalitions (n/2 drawn from the Shapley kernel, each with its complement), [n, L]."""
    sizes = torch.arange(1, L, dtype=torch.float64)
    p = (L - 1) / (sizes * (L - sizes))
    half = max(1, n // 2)
    s = sizes[torch.multinomial(p / p.sum(), half, replacement=True, generator=generator)].long()
    keys = torch.rand(half, L, generator=generator)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    masks = (ranks < s[:, None]).to(torch.float64)
    return torch.cat([masks, 1 - masks])


def kernel_shap_fit(masks: torch.Tensor, values: torch.Tensor, v_empty: float, v_full: float) -> torch.Tensor:
    """Least squares phi with sum(phi) = v_full - v_empty, coalitions already kernel-distributed."""
    Z = masks.to(torch.float64)
    y = values.to(torch.float64) - v_empty
    L = Z.shape[1]
    A = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    A[:L, :L] = Z.T @ Z
    A[:L, L] = 1.0
    A[L, :L] = 1.0
    b = torch.cat([Z.T @ y, torch.tensor([v_full - v_empty], dtype=torch.float64)])
    return torch.linalg.lstsq(A, b[:, None]).solution[:L, 0]


def kernel_shap(f: Game, L: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    masks = kernel_coalitions(L, n, generator)
    ends = torch.stack([torch.zeros(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)])
    values = f(torch.cat([masks, ends])).to(torch.float64)
    return kernel_shap_fit(masks, values[:-2], float(values[-2]), float(values[-1]))


def stratified_contributions(f: Game, masks: torch.Tensor) -> torch.Tensor:
    """mean over masks m of f(m with i) - f(m without i), for every player i, in two batches."""
    n, L = masks.shape
    masks = masks.to(torch.float64)
    with_i = masks[:, None, :].repeat(1, L, 1)
    without_i = with_i.clone()
    idx = torch.arange(L)
    with_i[:, idx, idx] = 1.0
    without_i[:, idx, idx] = 0.0
    a = f(with_i.reshape(-1, L)).reshape(n, L).to(torch.float64)
    b = f(without_i.reshape(-1, L)).reshape(n, L).to(torch.float64)
    return (a - b).mean(0)
