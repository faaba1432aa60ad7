"""OWL's outlier ratios against one plain forward of the dense model."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from layerprune.data import calibration_windows, load_text
from layerprune.models.adapter import ModelAdapter
from layerprune.models.tiny import tiny_model
from layerprune.scorers.outliers import score


def plain_outlier_ratios(model, blocks, input_ids, hyper_m):
    """Per block, the percentage of Wanda scores |W_ij| * ||X_j||_2 above hyper_m times their mean,
    pooled over every nn.Linear of the block. The inputs X come from forward pre-hooks during one
    forward of the whole model: nothing is pruned, so these are the inputs that block-by-block
    propagation sees. ||X_j|| runs over every token of every window."""
    linears = [
        [m for m in block.modules() if isinstance(m, nn.Linear)] for block in blocks
    ]  # the model's own modules, not the adapter's roles
    seen: dict[nn.Linear, list[torch.Tensor]] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.setdefault(m, []).append(args[0].detach()))
        for layers in linears
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    ratios, scores_per_block = [], []
    for layers in linears:
        pooled = []
        for layer in layers:
            (x,) = seen[layer]  # a single forward: one call per layer
            x = x.double().reshape(-1, x.shape[-1])
            assert x.shape[0] == input_ids.numel()
            norms = x.pow(2).sum(0).sqrt()
            pooled.append((layer.weight.detach().double().abs() * norms[None, :]).reshape(-1))
        scores = torch.cat(pooled)
        scores_per_block.append(scores)
        ratios.append(float((scores > hyper_m * scores.mean()).double().mean() * 100))
    return ratios, scores_per_block


def assert_same_ratios(ours, ratios, scores_per_block, hyper_m, margin=1e-5):
    """Equal to 1e-5 (relative). Where a score lies within `margin` (relative) of its threshold,
    float32 sums (ours) and float64 ones (here) may count it differently: such scores may go either
    way, every other one must be counted alike. Returns how many blocks had such scores."""
    assert len(ours) == len(ratios)
    undecided = 0
    for r_ours, r_plain, scores in zip(ours, ratios, scores_per_block):
        threshold = hyper_m * scores.mean()
        near = (scores - threshold).abs() <= margin * threshold
        if not near.any():
            assert r_ours == pytest.approx(r_plain, rel=1e-5, abs=1e-9)
            continue
        undecided += 1
        surely = float((scores > threshold * (1 + margin)).double().mean() * 100)
        maybe = float((scores > threshold * (1 - margin)).double().mean() * 100)
        assert surely * (1 - 1e-6) <= r_ours <= maybe * (1 + 1e-6)
    return undecided


@pytest.mark.parametrize("hyper_m", [3.0, 5.0])
def test_outlier_ratios_equal_a_plain_forward_on_a_tiny_llama(hyper_m):
    model = tiny_model("llama", num_layers=3)
    adapter = ModelAdapter(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (5, 16), generator=g)
    windows = SimpleNamespace(input_ids=ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = score(model, adapter, windows, batch_size=2, hyper_m=hyper_m, progress=False)  # 2 + 2 + 1
    ratios, scores = plain_outlier_ratios(model, adapter.blocks, ids, hyper_m)
    # q, o: 32x32; k, v: 16x32 (grouped KV heads); gate, up: 64x32; down: 32x64
    assert len(scores) == 3 and all(len(s) == 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32 for s in scores)
    assert assert_same_ratios(result.importance, ratios, scores, hyper_m, margin=1e-4) == 0
    assert result.extra["outlier_ratio_percent"] == result.importance and result.extra["hyper_m"] == hyper_m
    assert all(0 < r < 100 for r in ratios)  # neither empty nor everything: the comparison means something
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_outlier_ratios_equal_a_plain_forward_on_the_fixture(fixture_lm):
    lm = fixture_lm
    windows = calibration_windows(
        lm.tokenizer, load_text("fixture:val", default_split="train"), 4, 64, seed=0, bos="first"
    )
    result = score(lm.model, lm.adapter, windows, batch_size=2, hyper_m=5.0, progress=False)
    ratios, scores = plain_outlier_ratios(lm.model, lm.adapter.blocks, windows.input_ids, 5.0)
    assert len(ratios) == lm.adapter.num_blocks
    assert assert_same_ratios(result.importance, ratios, scores, 5.0) <= 3  # 786,432 scores a block
