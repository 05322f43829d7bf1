import pytest
import torch

from tests.helpers import correlated_inputs
from twla.quantization.methods import method_config
from twla.quantization.sections import TernaryConfig
from twla.quantization.weights import block_fitter, quantize_weight
from twla.solvers.gptq import damped_hessian, gptq
from twla.solvers.ternary import output_error


def layer_problem(n=24, m=200, tokens=800, seed=0):
    X = correlated_inputs(tokens, m, seed)
    W = torch.randn(n, m, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    return W, X.T @ X / tokens


def classic_gptq(W, S, fit, block_size, damp):
    """Textbook GPTQ: upper Cholesky factor U of H⁻¹, lazy update after each block; the
    block's final values are fitted first, then the column loop computes the errors."""
    H, _ = damped_hessian(S, damp)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = W.clone()
    Q = torch.zeros_like(W)
    m = W.shape[1]
    for i1 in range(0, m, block_size):
        i2 = min(i1 + block_size, m)
        Ub = U[i1:i2, i1:i2]
        Qb, _, _ = fit(W[:, i1:i2], torch.linalg.inv(Ub.T @ Ub), Ub.T @ Ub)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        for j in range(i2 - i1):
            err = (W1[:, j] - Qb[:, j]) / Ub[j, j]
            W1[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            Err[:, j] = err
        Q[:, i1:i2] = Qb
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return Q


def test_block_solve_equals_classic_column_loop():
    W, S = layer_problem(m=200)
    fit = block_fitter(method_config("pt2+gptq"))
    ours = gptq(W, S, fit, block_size=64, compensate=True, damp=0.01).weight
    ref = classic_gptq(W, S, fit, block_size=64, damp=0.01)
    assert torch.allclose(ours, ref, atol=1e-8)


@pytest.mark.parametrize("method", ["absmean", "pt2", "e2m"])
def test_compensation_lowers_output_error(method):
    W, S = layer_problem()
    plain, _ = quantize_weight(W, S, method_config(method))
    comp, _ = quantize_weight(W, S, method_config(method + "+gptq"))
    assert output_error(W, comp.dequantize(torch.float64), S) < 0.95 * output_error(
        W, plain.dequantize(torch.float64), S
    )


def test_stage_errors_decompose_the_output_error():
    """With compensation, Σ_b tr(E_b M_b E_bᵀ) of the final stage is tr(E H Eᵀ) exactly."""
    W, S = layer_problem(m=160)
    cfg = method_config("e2m+gptq")
    tw, res = quantize_weight(W, S, cfg)
    H, _ = damped_hessian(S, cfg.damp)
    total = output_error(W, res.weight, H)
    assert res.stage_output_error["refit"] == pytest.approx(total, rel=1e-8)
    assert res.stage_output_error["refit"] <= res.stage_output_error["gptq-round"] <= res.stage_output_error["itf"]


@pytest.mark.parametrize("spec", ["e2m+gptq", "pt2+gptq+ssr", "absmean", "twn+gptq+ssr"])
def test_partial_blocks_and_ternary_structure(spec):
    W, S = layer_problem(m=200)  # blocks of 128 + 72
    tw, res = quantize_weight(W, S, method_config(spec))
    assert tw.alpha.shape == (24, 2) and sorted(tw.perm.tolist()) == list(range(200))
    assert [b.numel() for b in res.blocks] == [128, 72]
    assert torch.allclose(tw.dequantize(torch.float64), res.weight, atol=1e-3 * res.weight.abs().max())
    for cols in res.blocks:  # one grid {μ−α, μ, μ+α} per (row, block)
        for row in tw.dequantize()[:, cols]:
            assert row.unique().numel() <= 3
    assert tw.is_reordered() == spec.endswith("+ssr")


@pytest.mark.parametrize("spec", ["pt2+gptq", "pt2+gptq+ssr", "rtn3+gptq+ssr", "pt2+gptq+ssr+struct"])
def test_the_grid_spreads_over_the_columns_exactly_as_an_indexed_gather(spec):
    """``per_column`` (a product with the block indicator) is x[:, block(j)] to the bit, and so is
    its gradient, with reordered columns and a partial last block."""
    W, S = layer_problem(m=200)
    tw, _ = quantize_weight(W, S, method_config(spec))
    block = tw.block_of_column()
    for x in tw.grid().values():
        leaf = x.clone().requires_grad_()
        (spread,) = tw.per_column(leaf)
        assert torch.equal(spread, x[:, block])
        weights = torch.randn(spread.shape, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad((spread * weights).sum(), leaf)
        (expected,) = torch.autograd.grad((leaf[:, block] * weights).sum(), leaf)
        assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-6)


def test_ssr_picks_columns_similar_to_the_mean():
    W, S = layer_problem(m=256)
    W[:, 200:] += 5.0  # a clearly similar group: same large offset in every row
    tw, res = quantize_weight(W, S, TernaryConfig(reorder=True, compensate=False))
    assert set(range(200, 256)) <= set(res.blocks[0].tolist())


def test_dead_inputs_are_handled():
    W, S = layer_problem(m=64)
    S[:, 3] = 0
    S[3, :] = 0
    tw, _ = quantize_weight(W, S, method_config("e2m+gptq"))
    assert torch.isfinite(tw.dequantize()).all()


def test_nan_weight_is_rejected():
    W, S = layer_problem(m=64)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(W, S, method_config("e2m"))


def test_bad_method_spec():
    with pytest.raises(ValueError, match="base must be one of"):
        method_config("int4")
    with pytest.raises(ValueError, match="unknown modifier"):
        method_config("e2m+awq")
