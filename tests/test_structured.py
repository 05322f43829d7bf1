"""Structured ternary: the codebook fit against brute-force and least-squares oracles, its GPTQ
use, exact bit accounting from first principles, and its refusals."""

import itertools
import math

import numpy as np
import pytest
import torch

from tests.helpers import correlated_inputs, tiny_llama
from twla import QuantConfig, pack_model, quantize
from twla.models.adapters import get_adapter
from twla.quantization.accounting import count_bits
from twla.quantization.sections import TernaryConfig
from twla.quantization.weights import StructuredWeight, quantize_weight
from twla.solvers import structured as st
from twla.solvers.ternary import itf, output_error


def _block(seed: int = 0, n: int = 24, m: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g, dtype=torch.float64) * torch.logspace(-0.5, 0.5, m, dtype=torch.float64)


def _levels(fit: st.StructuredFit, i: int, salient: bool, groups: int) -> list[tuple[float, tuple[int, int, int]]]:
    """Every value row i may take in a column, with its (class, t, u), enumerated directly."""
    if salient:
        c = fit.alpha.shape[1] - 1
        return [
            (float(fit.alpha[i, c] * t + fit.beta[i] * u + fit.mu[i, c]), (c, t, u))
            for t, u in itertools.product((-1, 0, 1), repeat=2)
        ]
    return [(float(fit.alpha[i, g] * t + fit.mu[i, g]), (g, t, 0)) for g in range(groups) for t in (-1, 0, 1)]


@pytest.mark.parametrize("k,groups", [(0, 2), (5, 1), (5, 2)])
def test_fit_never_increases_its_error_and_beats_plain_ternary(k, groups):
    W = _block()
    salient = st.salient_columns(W, torch.ones(W.shape[1], dtype=torch.float64), k)
    fit, trace = st.fit(W, salient, groups=groups, iters=8)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(trace, trace[1:], strict=False))
    plain = float(((W - itf(W, iters=8)[0].dequantize()) ** 2).sum())
    assert trace[-1] < 0.95 * plain  # more levels fit better
    assert int(salient.sum()) == k and fit.alpha.shape[1] == groups + (k > 0)


def test_assignment_is_the_nearest_allowed_level():
    W = _block(1)
    salient = st.salient_columns(W, torch.ones(W.shape[1], dtype=torch.float64), 6)
    fit, _ = st.fit(W, salient, groups=2, iters=3)
    W2 = W + 0.3 * _block(2)  # other values on the same coefficients
    got = st.assign(W2, fit, salient, 2).dequantize()
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            best = min(abs(float(W2[i, j]) - v) for v, _ in _levels(fit, i, bool(salient[j]), 2))
            assert abs(float(W2[i, j] - got[i, j])) == pytest.approx(best, abs=1e-12)


def test_coefficients_solve_the_metric_least_squares_problem():
    """Against an oracle that builds each row's basis vectors element by element and solves the
    M-weighted least squares with numpy (M = L Lᵀ)."""
    W = _block(3)
    salient = st.salient_columns(W, torch.ones(W.shape[1], dtype=torch.float64), 4)
    fit, _ = st.fit(W, salient, groups=2, iters=2)
    X = correlated_inputs(200, W.shape[1], seed=4)
    M = X.T @ X
    got = st.coefficients(W, fit, M=M)
    L = np.linalg.cholesky(M.numpy())
    C = fit.alpha.shape[1]
    for i in range(W.shape[0]):
        basis = np.zeros((2 * C + 1, W.shape[1]))
        for j in range(W.shape[1]):
            c = int(fit.classes[i, j])
            basis[c, j], basis[C + c, j], basis[2 * C, j] = fit.codes[i, j], 1.0, fit.residual[i, j]
        theta = np.linalg.lstsq((basis @ L).T, L.T @ W[i].numpy(), rcond=None)[0]
        best = np.sum(((W[i].numpy() - theta @ basis) @ L) ** 2)
        E = (W[i] - got.dequantize()[i]).numpy()
        assert E @ M.numpy() @ E == pytest.approx(best, rel=1e-9)


def test_gptq_compensation_and_the_stored_levels():
    torch.manual_seed(0)
    X = correlated_inputs(512, 160, seed=5)
    W = torch.randn(48, 160, dtype=torch.float64)
    S = X.T @ X / X.shape[0]
    cfg = TernaryConfig(salient=8, groups=2, reorder=True)
    weight, res = quantize_weight(W, S, cfg)
    plain, _ = quantize_weight(W, S, TernaryConfig(salient=8, groups=2, compensate=False))
    assert isinstance(weight, StructuredWeight)
    assert res.stage_output_error["refit"] < 0.8 * output_error(W, plain.dequantize(torch.float64), S)
    Wq = weight.dequantize(torch.float64)
    salient = weight.salient()
    for b in range(weight.alpha.shape[1]):
        cols = weight.perm[b * 128 : (b + 1) * 128]
        sal = cols[salient[cols]]
        assert len(sal) == 8  # blocks of 128 and 32 columns each have 8 salient columns
        assert max(row.unique().numel() for row in Wq[:, sal]) <= 9
        assert max(row.unique().numel() for row in Wq[:, cols[~salient[cols]]]) <= 6
    assert torch.equal(weight.alpha, weight.alpha.half().float())


def test_bits_are_counted_from_first_principles(calib_ids):
    model, report = quantize(
        tiny_llama(), QuantConfig.from_method("pt2+gptq+ssr+struct"), calib_ids, device="cpu", progress=False
    )
    counted = count_bits(model, get_adapter(model), report.weights)
    total, count = 0, 0
    for w in report.weights.values():
        n, m = w.shape
        count += n * m
        salient = sum(min(8, m - start) for start in range(0, m, 128))
        # plane-1 codes everywhere, plane-2 codes in salient columns: a byte per 5 codes of a row
        total += n * 8 * (-(-m // 5) + -(-salient // 5))
        for start in range(0, m, 128):
            B = min(128, m - start)
            k = min(8, B)
            # a group bit outside the salient columns
            total += n * (B - k)
            # α, μ for two groups and the salient class, β: 16 bits each per row; salient indices
            total += 16 * n * 7 + k * math.ceil(math.log2(B))
        total += 16 * m * w.is_reordered()
    assert counted.storage_bits_per_weight == pytest.approx(total / count)
    planes = [(w.shape[0], w.shape[1], int(w.salient().sum())) for w in report.weights.values()]
    entropy_gap = sum(n * 8 * (-(-m // 5) + -(-s // 5)) - n * (m + s) * math.log2(3) for n, m, s in planes)
    assert counted.storage_bits_per_weight - counted.entropy_bits_per_weight == pytest.approx(entropy_gap / count)


def test_structured_weights_are_refused_where_they_do_not_fit(calib_ids):
    with pytest.raises(ValueError, match="struct applies to ternary weights, not to rtn4"):
        QuantConfig.from_method("rtn4+gptq+struct")
    with pytest.raises(ValueError, match="start from ITF"):
        QuantConfig.from_method("absmean+sal")
    with pytest.raises(ValueError, match="several choices of structured ternary"):
        QuantConfig.from_method("pt2+sal+struct")
    with pytest.raises(ValueError, match="structured ternary.*plain ternary and integer weights"):
        QuantConfig.from_method("pt2+gptq+struct").check_packable("pt2+gptq+struct")
    model, report = quantize(tiny_llama(), QuantConfig.from_method("pt2+sal"), calib_ids, device="cpu", progress=False)
    with pytest.raises(NotImplementedError, match="stores plain ternary and integer weights"):
        pack_model(model, report.weights)
