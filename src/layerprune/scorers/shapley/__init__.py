"""Shapley layer contributions (Pruning as a Cooperative Game), as a depth scorer.

players = blocks; utility s(m) = PPL(dense) / PPL(model with the blocks of m only), on calibration
windows, removed blocks skipped. Real utilities come from the trie engine (shared prefixes computed
once) through the evaluation store, so a killed run resumes without redoing any mask.

Estimators (`estimator=`):
- "stratified" (the paper's): surrogate trained on stratified masks, then mean of
  f(m with i) - f(m without i) over fresh masks from the same strata;
- "shapley": true Shapley values of the surrogate game: exact enumeration of the surrogate for
  L <= 16, else antithetic permutation sampling (`sampler="permutation"`) or KernelSHAP ("kernel");
- "kernel": KernelSHAP directly on real utilities of kernel-distributed masks (no surrogate);
- "exact": exact Shapley values of the real utility from all 2^L masks (L <= 16): the ground truth.
"""

from __future__ import annotations

import math

import torch

from ...engine.masked import MaskEvaluator
from ...errors import LayerpruneError
from ..base import MethodScores
from .game import (
    all_masks,
    exact_shapley,
    kernel_coalitions,
    kernel_shap,
    kernel_shap_fit,
    permutation_shapley,
    stratified_contributions,
)
from .masks import check_strata, default_strata, stratified_masks
from .surrogate import fit_surrogate, one_thread

ESTIMATORS = ("stratified", "shapley", "kernel", "exact")
EXACT_MAX_L = 16


def score(
    model,
    adapter,
    windows,
    *,
    unit="block",
    removed=None,
    batch_size=16,
    progress=True,
    store=None,
    estimator="stratified",
    budget=256,
    strata=None,
    ratio=0.25,
    seed=0,
    hidden=None,
    epochs=None,
    schedule="steps",
    sampler="auto",
    surrogate_samples=4000,
):
    if unit != "block":
        raise LayerpruneError("shapley scores whole blocks; use --unit block")
    if removed is not None and any(removed):
        raise LayerpruneError("shapley values are computed once for all blocks; drop --iterative")
    if estimator not in ESTIMATORS:
        raise LayerpruneError(f"unknown estimator '{estimator}'; use one of {', '.join(ESTIMATORS)}")
    L = adapter.num_blocks
    if estimator == "exact" and L > EXACT_MAX_L:
        raise LayerpruneError(
            f"exact Shapley needs all 2^{L} masks; with {L} blocks use --estimator stratified or shapley"
        )
    strata = list(strata) if strata else default_strata(L, ratio)
    if estimator in ("stratified", "shapley"):
        check_strata(strata, L, budget)
    elif budget < 2:
        raise LayerpruneError(f"a budget of {budget} real evaluations is too small; raise --budget")
    evaluator = MaskEvaluator(
        model,
        adapter,
        windows.input_ids,
        store=store,
        batch_size=batch_size,
        progress=progress,
        allow_empty=True,
    )
    full = tuple([1] * L)
    dense_nll = evaluator.nll([full])[0]

    def utility(masks: list[tuple[int, ...]]) -> torch.Tensor:
        nll = torch.tensor(evaluator.nll(masks), dtype=torch.float64)
        return torch.exp((dense_nll - nll) / evaluator.tokens)  # PPL(dense) / PPL(mask)

    g = torch.Generator().manual_seed(seed)
    extra: dict = {"estimator": estimator, "strata": strata}
    if estimator == "exact":
        table = all_masks(L)
        values = utility([tuple(int(b) for b in row) for row in table.long().tolist()])
        phi = exact_shapley(values, L)
    elif estimator == "kernel":
        coalitions = kernel_coalitions(L, budget - 2, g)
        masks = [tuple(int(b) for b in row) for row in coalitions.long().tolist()]
        values = utility(masks + [tuple([0] * L)])
        masks_t, values, kept = _finite(coalitions, values[:-1])
        extra["dropped_non_finite"] = kept
        phi = kernel_shap_fit(masks_t, values, float(utility([tuple([0] * L)])[0]), 1.0)
    else:
        masks = stratified_masks(L, strata, budget, seed)
        values = utility(masks)
        masks_t, values, dropped = _finite(torch.tensor(masks, dtype=torch.float64), values)
        extra["dropped_non_finite"] = dropped
        fit = fit_surrogate(masks_t, values, hidden=hidden, schedule=schedule, epochs=epochs, seed=seed)
        extra["surrogate"] = {
            "r2": fit.r2,
            "spearman": fit.spearman,
            "train": fit.train,
            "heldout": fit.heldout,
            "hidden": hidden or 2 * L,
            "schedule": schedule,
            "epochs": epochs or (3000 if schedule == "steps" else 300),
            "lr": fit.lr,
        }
        if estimator == "stratified":
            fresh = stratified_masks(
                L, strata, min(surrogate_samples, sum(math.comb(L, k) for k in strata)), seed + 1
            )
            with one_thread():  # the same bits under torchrun's one thread per rank
                phi = stratified_contributions(fit, torch.tensor(fresh, dtype=torch.float64))
        else:
            mode = sampler if sampler != "auto" else ("enumerate" if L <= EXACT_MAX_L else "permutation")
            extra["sampler"] = mode
            with one_thread():
                if mode == "enumerate":
                    phi = exact_shapley(fit(all_masks(L)), L)
                elif mode == "permutation":
                    phi = permutation_shapley(fit, L, surrogate_samples, g)
                elif mode == "kernel":
                    phi = kernel_shap(fit, L, surrogate_samples, g)
                else:
                    raise LayerpruneError(
                        f"unknown sampler '{sampler}'; use auto, enumerate, permutation or kernel"
                    )
    extra["evaluations"] = evaluator.distinct_masks
    extra["evaluations_this_run"] = evaluator.evaluations
    extra["block_calls"] = evaluator.runner.block_calls  # (block, micro-batch) forwards run
    return MethodScores([float(v) for v in phi], extra)


def _finite(masks: torch.Tensor, values: torch.Tensor):
    """Drop NaN / infinite utilities *together with their masks* (the reference misaligns them)."""
    ok = torch.isfinite(values)
    return masks[ok], values[ok], int((~ok).sum())
