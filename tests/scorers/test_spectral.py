import math

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.scorers.spectral import eigenvalues, hill_alpha, matrix_metrics


def reference_loop(eigs, corrected=False):
    """The reference's scan written as a plain loop (independent of our vectorised version)."""
    eigs = eigs.float()
    N = len(eigs)
    log10 = eigs.log10()
    counts = torch.histc(log10, bins=100, min=float(log10.min()), max=float(log10.max()))
    edges = torch.linspace(float(log10.min()), float(log10.max()), 101)
    p = 10 ** float(edges[int(counts.argmax())])
    lo = 0.95 * p if corrected else math.log10(0.95 * p)
    alphas, Ds = [0.0] * (N - 1), [1.0] * (N - 1)
    for i in range(N - 1):
        x = float(eigs[i])
        if x < lo:
            continue
        if x > 1.5 * p:
            break
        n = N - i
        tail = eigs[i:].double()
        a = 1 + n / (float(tail.log().sum()) - n * math.log(float(tail[0])))
        alphas[i] = a
        if a > 1:
            Ds[i] = max(abs(1 - (float(tail[k]) / float(tail[0])) ** (1 - a) - k / n) for k in range(n))
    return alphas[min(range(N - 1), key=lambda i: Ds[i])]


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_recovers_a_known_power_law(alpha):
    g = torch.Generator().manual_seed(int(alpha * 10))
    u = torch.rand(4000, generator=g, dtype=torch.float64)
    eigs = (0.5 * (1 - u) ** (-1 / (alpha - 1))).sort().values  # Pareto(alpha) eigenvalues
    for bound in ("reference", "corrected"):
        assert hill_alpha(eigs, lower_bound=bound)["alpha"] == pytest.approx(alpha, rel=0.05)
    assert hill_alpha(eigs, xmin="mid")["alpha"] == pytest.approx(alpha, rel=0.1)


@pytest.mark.parametrize("shape", [(64, 128), (96, 96), (128, 40)])
def test_vectorised_fit_equals_the_reference_loop(shape):
    g = torch.Generator().manual_seed(shape[0])
    W = torch.randn(*shape, generator=g) * torch.rand(shape[1], generator=g) * 3
    e = eigenvalues(W)
    for corrected in (False, True):
        ours = hill_alpha(e, lower_bound="corrected" if corrected else "reference")["alpha"]
        assert ours == pytest.approx(reference_loop(e, corrected), rel=1e-6)


def test_other_metrics_and_bad_spectra():
    W = torch.diag(torch.tensor([4.0, 2.0, 1.0] + [0.5] * 29))
    m = matrix_metrics(W + 1e-3 * torch.randn(32, 32))
    assert m["spectral_norm"] == pytest.approx(16.0, rel=0.01)
    assert m["stable_rank"] == pytest.approx((16 + 4 + 1 + 29 * 0.25) / 16, rel=0.02)
    assert 0 < m["entropy"] < 1
    assert m["alpha_hat"] == pytest.approx(m["alpha_peak"] * math.log10(m["spectral_norm"]))
    with pytest.raises(LayerpruneError, match="too few to fit a power law"):
        hill_alpha(eigenvalues(torch.randn(4, 8)))


def test_agreement_with_weightwatcher_is_reported(fixture_lm):
    ww = pytest.importorskip("weightwatcher")  # not a dependency: only where a user installed it
    layer = fixture_lm.adapter.linears(3)["down"]
    ours = matrix_metrics(fixture_lm.adapter.weight(layer))["alpha_peak"]
    details = ww.WeightWatcher(model=torch.nn.Sequential(torch.nn.Linear(768, 256))).analyze()
    print(f"alpha_peak {ours:.3f}, weightwatcher alpha {float(details.alpha.iloc[0]):.3f}")
    assert math.isfinite(ours)
