import contextlib
import math

import pytest
import torch

from layerprune.errors import LayerpruneError
from layerprune.scorers import spectral
from layerprune.scorers.spectral import EVALS_THRESH, eigenvalues, hill_alpha, matrix_metrics


@pytest.fixture(autouse=True)
def _one_thread():
    """These spectra are small: one thread is as fast alone and many times faster when other processes
    share the cores (threads then wait on each other: 84 fixture SVDs 12 s on two threads, 0.8 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_loop(eigs, corrected=False):
    """AlphaPruning's `net_esd_estimator` for one spectrum (filter_zeros=False, fix_fingers='xmin_peak',
    100 bins), written independently of our vectorised version as the reference's loop over candidates.

    `eigs` are the float32 squared singular values, ascending, and all of them are used (no filtering).
    The histogram of log10(eigs) and the xmin bounds are float32 tensor arithmetic as in the reference,
    so that each comparison with a float32 eigenvalue decides as there; the fit of each candidate is
    done in float64. `corrected` replaces the reference's lower bound log10(0.95 p) by 0.95 p."""
    eigs = eigs.float()
    N = len(eigs)
    log10 = torch.log10(eigs)
    lo, hi = log10.min(), log10.max()
    counts = torch.histc(log10, bins=100, min=float(lo), max=float(hi))
    boundaries = torch.linspace(lo, hi, 101)
    xmin2 = 10 ** boundaries[torch.argmax(counts)]
    xmin_min = float(0.95 * xmin2 if corrected else torch.log10(0.95 * xmin2))
    xmin_max = float(1.5 * xmin2)
    e64 = eigs.double()
    log_e = e64.log()
    alphas, Ds = [0.0] * (N - 1), [1.0] * (N - 1)
    for i, xmin in enumerate(eigs[:-1].tolist()):  # exact float32 values
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = N - i
        alpha = 1 + n / (float(log_e[i:].sum()) - n * float(log_e[i]))
        alphas[i] = alpha
        if alpha > 1:
            seq = torch.arange(n, dtype=torch.float64)
            Ds[i] = float((1 - (e64[i:] / e64[i]) ** (1 - alpha) - seq / n).abs().max())
    return alphas[min(range(N - 1), key=lambda i: Ds[i])]  # the first minimum, as torch.argmin


def tiny_eigenvalue_matrix():
    """192 x 128, heavy-tailed singular values plus six between 1e-4 and 1e-3 (eigenvalues 1e-8..1e-6,
    below EVALS_THRESH but not zero). With them the log10 histogram spans 10 decades instead of 4, the
    fullest bin moves, and the alpha of the default fit differs from filter_zeros=True."""
    g = torch.Generator().manual_seed(7)
    U = torch.linalg.qr(torch.randn(192, 128, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0]
    u = torch.rand(122, generator=g, dtype=torch.float64)
    s = torch.cat([torch.logspace(-4, -3, 6, dtype=torch.float64), 0.2 * (1 - u) ** -0.5])
    return ((U * s) @ V.T).float()


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


def test_default_fit_equals_the_reference_estimator_on_the_fixture_and_tiny_eigenvalues(fixture_lm):
    adapter = fixture_lm.adapter
    spectra = {name: eigenvalues(adapter.weight(adapter.layer(name))) for name in adapter.layer_names()}
    assert len(spectra) == 84
    # the case of the bug: some fixture matrices have eigenvalues <= EVALS_THRESH (none exactly zero)
    assert sum(bool((e <= EVALS_THRESH).any()) for e in spectra.values()) >= 4
    spectra["tiny"] = eigenvalues(tiny_eigenvalue_matrix())
    assert int((spectra["tiny"] <= EVALS_THRESH).sum()) == 6
    for name, e in spectra.items():
        assert bool((e > 0).all()), name
        assert hill_alpha(e)["alpha"] == pytest.approx(reference_loop(e), rel=1e-5), name


def test_filter_zeros_drops_tiny_eigenvalues_and_changes_alpha():
    e = eigenvalues(tiny_eigenvalue_matrix())
    default = hill_alpha(e)["alpha"]
    filtered = hill_alpha(e, filter_zeros=True)["alpha"]
    assert abs(default - filtered) > 0.01  # the option is real: 1.910 against 1.941
    assert filtered == pytest.approx(reference_loop(e[e > EVALS_THRESH]), rel=1e-5)
    assert default == pytest.approx(reference_loop(e), rel=1e-5)
    assert hill_alpha(e, "mid", filter_zeros=True)["alpha"] == hill_alpha(e[6:], "mid")["alpha"]
    W = tiny_eigenvalue_matrix()
    assert matrix_metrics(W)["alpha_peak"] == default
    assert matrix_metrics(W, filter_zeros=True)["alpha_peak"] == filtered


def test_exact_zero_eigenvalues_are_dropped_without_nan():
    g = torch.Generator().manual_seed(3)
    W = torch.zeros(64, 48)
    W[:, :40] = torch.randn(64, 40, generator=g) * torch.rand(40, generator=g)  # rank 40 of 48
    e = eigenvalues(W)
    assert int((e == 0).sum()) == 8  # exact zeros: ln 0 = -inf would poison the fit
    for filter_zeros in (False, True):
        m = matrix_metrics(W, filter_zeros=filter_zeros)
        assert all(math.isfinite(v) for v in m.values()), m
        assert m["alpha_peak"] > 1
    # dropping exact zeros is all the default does: the fit equals that of the nonzero spectrum
    assert hill_alpha(e) == hill_alpha(e[8:])
    assert hill_alpha(e, "mid") == hill_alpha(e[8:], "mid")
    assert hill_alpha(e)["alpha"] == pytest.approx(reference_loop(e[8:]), rel=1e-5)


class StubAdapter:
    """Two blocks of one linear layer each: the tiny-eigenvalue matrix and a random one."""

    roles = ("w",)
    num_blocks = 2

    def __init__(self):
        self.layers = [torch.nn.Linear(128, 192, bias=False) for _ in range(2)]
        with torch.no_grad():
            self.layers[0].weight.copy_(tiny_eigenvalue_matrix())

    def linears(self, i):
        return {"w": self.layers[i]}

    def resident(self, i):  # every block is in memory
        return contextlib.nullcontext()

    def layer_names(self):
        return ["0.w", "1.w"]

    def weight(self, layer):
        return layer.weight


def test_score_records_filter_zeros_and_caches_the_settings_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    adapter = StubAdapter()
    kept = spectral.score(None, adapter, progress=False, fingerprint="abc")
    dropped = spectral.score(None, adapter, progress=False, fingerprint="abc", filter_zeros=True)
    assert kept.extra["filter_zeros"] is False and dropped.extra["filter_zeros"] is True
    assert kept.extra["metric_values"][0] != dropped.extra["metric_values"][0]
    assert kept.extra["metric_values"][1] == dropped.extra["metric_values"][1]  # no tiny eigenvalues
    files = sorted(p.name for p in (tmp_path / "esd").iterdir())
    assert len(files) == 2 and all(f.startswith("abc-reference-") and "-v2" in f for f in files)
    # the cache serves each setting its own values (a stale file of the other setting is never read)
    again = spectral.score(None, adapter, progress=False, fingerprint="abc", filter_zeros=True)
    assert again.extra["metric_values"] == dropped.extra["metric_values"]
    assert (tmp_path / "esd" / "abc-reference.json").exists() is False  # the old, unversioned name


def test_no_fit_error_names_the_real_option():
    # log10 range -9..9: bins 0.18 wide, wider than log10(1.5). The cluster at 10^2.158 fills the bin
    # [1.98, 2.16), so p = 10^1.98 and the cluster lies above 1.5 p = 10^2.156: no candidate at all.
    cluster = 10**2.158 * (1 + 1e-4 * torch.arange(20, dtype=torch.float64))
    e = torch.cat([torch.tensor([1e-9]), cluster, torch.tensor([1e9])]).float()
    with pytest.raises(LayerpruneError, match="no xmin candidate.*--metric alpha_mid"):
        hill_alpha(e)
    assert math.isfinite(hill_alpha(e, "mid")["alpha"])  # the fit the message suggests works
