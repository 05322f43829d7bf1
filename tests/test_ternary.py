import pytest
import torch

from tests.helpers import correlated_inputs
from twla.solvers.ternary import (
    TernaryFit,
    absmean,
    codes_given_grid,
    grid_given_codes,
    itf,
    output_error,
    refit_metric,
    twn,
    weight_error,
)


def random_codes(n: int, m: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(-1, 2, (n, m), generator=torch.Generator().manual_seed(seed)).to(torch.int8)


def test_grid_given_codes_matches_least_squares():
    W = torch.randn(16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = random_codes(16, 40)
    alpha, mu = grid_given_codes(W, T)
    for i in range(16):
        A = torch.stack([T[i].double(), torch.ones(40, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(A, W[i, :, None]).solution.squeeze(1)
        assert torch.allclose(torch.stack([alpha[i], mu[i]]), sol, atol=1e-10)


def test_refit_metric_matches_weighted_least_squares():
    m = 48
    X = correlated_inputs(500, m)
    M = X.T @ X / 500
    W = torch.randn(12, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    T = random_codes(12, m, seed=3)
    alpha, mu = refit_metric(W, T, M)
    L = torch.linalg.cholesky(M)  # tr(E M Eᵀ) = ‖E L‖²
    for i in range(12):
        A = torch.stack([T[i].double(), torch.ones(m, dtype=torch.float64)], dim=1)
        sol = torch.linalg.lstsq(L.T @ A, L.T @ W[i, :, None]).solution.squeeze(1)
        assert torch.allclose(torch.stack([alpha[i], mu[i]]), sol, atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_itf_lsq_never_increases_error(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(32, 128, generator=g, dtype=torch.float64) * torch.rand(32, 1, generator=g) + torch.randn(
        32, 1, generator=g
    )
    fit, trace = itf(W, iters=12, rule="lsq")
    start = weight_error(W, absmean(W).dequantize())
    assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:], strict=False))
    assert weight_error(W, fit.dequantize()) <= trace[-1] + 1e-9
    assert weight_error(W, fit.dequantize()) < start


def test_itf_twn_rule_fits_offset_rows():
    W = torch.randn(8, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 3.0
    fit, _ = itf(W, iters=15, rule="twn")  # large per-row offset: the symmetric TWN fit cannot follow
    assert weight_error(W, fit.dequantize()) < 0.5 * weight_error(W, twn(W).dequantize())
    assert (fit.mu - 3.0).abs().max() < 0.5


def test_refit_never_increases_output_error():
    m = 64
    X = correlated_inputs(400, m, seed=2)
    M = X.T @ X / 400
    for seed in range(5):
        W = torch.randn(24, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fit, _ = itf(W, iters=10, rule="lsq")
        refit = TernaryFit(fit.codes, *refit_metric(W, fit.codes, M))
        assert output_error(W, refit.dequantize(), M) <= output_error(W, fit.dequantize(), M) + 1e-10


def test_codes_are_ternary_and_nearest():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(10, 30, generator=g, dtype=torch.float64)
    alpha = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    mu = torch.randn(10, generator=g, dtype=torch.float64) * 0.1
    T = codes_given_grid(W, alpha, mu)
    assert set(T.unique().tolist()) <= {-1, 0, 1}
    grid = mu[:, None, None] + alpha[:, None, None] * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    best = (W[:, :, None] - grid).abs().min(-1).values
    assert torch.allclose((W - TernaryFit(T, alpha, mu).dequantize()).abs(), best)


@pytest.mark.parametrize("fitter", ["absmean", "twn", "lsq", "twn_rule", "refit"])
def test_degenerate_rows(fitter):
    W = torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W[0] = 0.0  # all-zero row
    W[1] = 2.5  # constant row
    W[2, :] = 0.0
    W[2, 5] = 1.0  # single non-zero entry
    if fitter == "absmean":
        fit = absmean(W)
    elif fitter == "twn":
        fit = twn(W)
    elif fitter == "refit":
        base, _ = itf(W, iters=5, rule="lsq")
        fit = TernaryFit(base.codes, *refit_metric(W, base.codes, torch.eye(32, dtype=torch.float64)))
    else:
        fit, _ = itf(W, iters=5, rule="lsq" if fitter == "lsq" else "twn")
    W_hat = fit.dequantize()
    assert torch.isfinite(W_hat).all()
    assert torch.allclose(W_hat[0], torch.zeros(32, dtype=torch.float64))
    if fitter not in ("absmean", "twn"):  # offset-free grids cannot represent a constant row exactly
        assert torch.allclose(W_hat[1], W[1])
        assert torch.allclose(W_hat[2], W[2])
