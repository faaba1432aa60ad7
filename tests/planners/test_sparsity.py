from pathlib import Path

import numpy as np
import pytest

from layerprune.errors import LayerpruneError
from layerprune.planners.sparsity import alpha, owl, uniform

ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "alphapruning"


def llama_layers(L, hidden=4096, ffn=11008):
    names = [f"{b}.{r}" for b in range(L) for r in ROLES]
    numel = ([hidden * hidden] * 4 + [hidden * ffn] * 3) * L
    return names, numel


def weighted_mean(alloc, names, numel):
    return sum(alloc[n] * p for n, p in zip(names, numel)) / sum(numel)


def test_every_allocation_meets_the_target():
    rng = np.random.default_rng(0)
    names, numel = llama_layers(12, 256, 768)
    metric = list(rng.uniform(2, 6, len(names)))
    for s in (0.5, 0.6, 0.7, 0.8):
        assert weighted_mean(uniform(names, s), names, numel) == pytest.approx(s, abs=1e-6)
        a = alpha(names, numel, metric, s, epsilon=0.1)
        assert weighted_mean(a, names, numel) == pytest.approx(s, abs=1e-6)
        o = owl(names, list(rng.uniform(0, 3, 12)), s, 0.08)
        assert weighted_mean(o, names, numel) == pytest.approx(s, abs=1e-6)


def test_alpha_direction_and_owl_direction():
    names, numel = llama_layers(3, 8, 16)
    metric = [2.0] * 7 + [4.0] * 7 + [6.0] * 7  # block 2 has the lightest tails
    a = alpha(names, numel, metric, 0.5, 0.2)
    assert a["0.q"] < a["1.q"] < a["2.q"]  # higher alpha: pruned more
    o = owl(names, [5.0, 1.0, 3.0], 0.5, 0.08)
    assert o["0.q"] < o["2.q"] < o["1.q"]  # more outliers: pruned less
    assert o["1.q"] - o["0.q"] == pytest.approx(0.16)  # a spread of 2 lambda


def test_alpha_errors_and_clip():
    names, numel = llama_layers(4, 8, 16)
    metric = [1.0] * 7 + [2.0] * 7 + [3.0] * 7 + [9.0] * 7
    with pytest.raises(LayerpruneError, match=r"use --epsilon 0\.\d+ or less, or --clip"):
        alpha(names, numel, metric, 0.8, 0.9)
    clipped = alpha(names, numel, metric, 0.8, 0.9, clip=True)
    assert max(clipped.values()) <= 0.99 and min(clipped.values()) >= 0
    assert weighted_mean(clipped, names, numel) == pytest.approx(0.8, abs=1e-6)
    for bad in (1.0, -0.1):
        with pytest.raises(LayerpruneError, match="must be in"):
            uniform(names, bad)


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference is beside a developer checkout only")
def test_published_llama7b_allocation():
    """AlphaPruning's shipped LLaMA-7B alphas at 70%, eps 0.2: block sparsities 0.57 ... 0.85."""
    metric = np.load(REFERENCE / "llama-7b-hf.alpha_peak.npy").tolist()
    names, numel = llama_layers(32)
    a = alpha(names, numel, metric, 0.7, 0.2)
    blocks = [a[f"{b}.q"] for b in range(32)]
    assert blocks[0] == pytest.approx(0.5704, abs=1e-4) and max(blocks) == pytest.approx(0.852, abs=1e-3)
    with pytest.raises(LayerpruneError, match="sparsity 1.063"):  # the reference's unclipped 80%, eps 0.3
        alpha(names, numel, metric, 0.8, 0.3)
