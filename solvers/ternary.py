"""Ternary weight fits: Ŵ = diag(α) T + μ 1ᵀ with T ∈ {−1, 0, +1}^{n×m}.

Every function works row-wise on a weight block W ∈ ℝ^{n×m} and is batched over
rows. Closed forms are solved in float64; callers cast back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ItfRule = Literal["lsq", "twn"]


@dataclass
class TernaryFit:
    """Codes T (int8, n×m) with per-row scale α (n) and offset μ (n)."""

    codes: Tensor
    alpha: Tensor
    mu: Tensor

    def dequantize(self) -> Tensor:
        """Ŵ = diag(α) T + μ 1ᵀ."""
        return self.alpha[:, None] * self.codes.to(self.alpha.dtype) + self.mu[:, None]


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def absmean(W: Tensor) -> TernaryFit:
    """BitNet b1.58: s = mean|W| per row, T = clamp(round(W/s), −1, 1), Ŵ = sT."""
    W = _f64(W)
    s = W.abs().mean(dim=1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    T = torch.clamp(torch.round(W / safe[:, None]), -1, 1)
    return TernaryFit(T.to(torch.int8), s, torch.zeros_like(s))


def threshold_codes(W: Tensor, delta: Tensor) -> Tensor:
    """TWN codes: T_ij = sign(W_ij) where |W_ij| > Δ_i, else 0."""
    return (torch.sign(W) * (W.abs() > delta[:, None])).to(torch.int8)


def twn_scale(W: Tensor, T: Tensor) -> Tensor:
    """TWN scale α_i = Σ_j T_ij W_ij / Σ_j |T_ij| (0 for rows without non-zero codes)."""
    Tf = T.to(W.dtype)
    nnz = Tf.abs().sum(dim=1)
    return torch.where(nnz > 0, (Tf * W).sum(dim=1) / nnz.clamp(min=1), torch.zeros_like(nnz))


def twn(W: Tensor) -> TernaryFit:
    """TWN: Δ_i = 0.75·mean_j|W_ij|, T by threshold ±Δ_i, α_i = Σ T W / Σ |T|, μ = 0."""
    W = _f64(W)
    T = threshold_codes(W, 0.75 * W.abs().mean(dim=1))
    alpha = twn_scale(W, T)
    return TernaryFit(T, alpha, torch.zeros_like(alpha))


def grid_given_codes(W: Tensor, T: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row least squares min_{α,μ} ‖w_i − α t_i − μ 1‖².

    Solved in W's dtype and differentiable in W (the codes are held fixed), so it also
    serves as the closed-form grid inside gradient-based relocation.

    With a = (W∘T)1, t = T1, u = W1, q = (T∘T)1, den = m·q − t²:
    α = (m·a − t∘u)/den, μ = (q∘u − t∘a)/den. Rows with den = 0 get α = 0, μ = row mean.
    """
    Tf = T.to(W.dtype)
    m = W.shape[1]
    a, t, u, q = (W * Tf).sum(1), Tf.sum(1), W.sum(1), (Tf * Tf).sum(1)
    den = m * q - t * t
    ok = den > 0.5  # den is an integer: ≥ 1 when the row's codes are not constant
    safe = torch.where(ok, den, torch.ones_like(den))
    alpha = torch.where(ok, (m * a - t * u) / safe, torch.zeros_like(den))
    mu = torch.where(ok, (q * u - t * a) / safe, u / m)
    return alpha, mu


def codes_given_grid(W: Tensor, alpha: Tensor, mu: Tensor) -> Tensor:
    """Nearest grid point: T_ij = clamp(round((W_ij − μ_i)/α_i), −1, 1); 0 where α_i = 0."""
    W = _f64(W)
    ok = alpha != 0
    safe = torch.where(ok, alpha, torch.ones_like(alpha))
    T = torch.clamp(torch.round((W - mu[:, None]) / safe[:, None]), -1, 1)
    return (T * ok[:, None]).to(torch.int8)


def itf(W: Tensor, *, iters: int = 10, rule: ItfRule = "lsq") -> tuple[TernaryFit, list[float]]:
    """Iterative Ternary Fitting: min_{T,α,μ} ‖W − diag(α)T − μ1ᵀ‖²_F by alternation.

    Initialization: μ = row mean, then TWN on W − μ.
    - ``rule="lsq"`` (PT²-LLM): alternate the exact grid (:func:`grid_given_codes`) and
      nearest-grid codes (:func:`codes_given_grid`); the error never increases.
    - ``rule="twn"`` (TWLA stage 1): keep the TWN threshold rule on W − μ for (T, α) and
      correct μ ← μ + mean_j(W − Ŵ).

    Returns the fit and the squared Frobenius error after each iteration.
    """
    W = _f64(W)
    mu = W.mean(dim=1)
    start = twn(W - mu[:, None])
    T, alpha = start.codes, start.alpha
    trace: list[float] = []
    for _ in range(iters):
        if rule == "lsq":
            alpha, mu = grid_given_codes(W, T)
            T = codes_given_grid(W, alpha, mu)
        elif rule == "twn":
            centred = W - mu[:, None]
            T = threshold_codes(centred, 0.75 * centred.abs().mean(dim=1))
            alpha = twn_scale(centred, T)
            mu = mu + (W - TernaryFit(T, alpha, mu).dequantize()).mean(dim=1)
        else:
            raise ValueError(f"unknown ITF rule {rule!r}; choose 'lsq' or 'twn'")
        trace.append(weight_error(W, TernaryFit(T, alpha, mu).dequantize()))
    if rule == "lsq":
        alpha, mu = grid_given_codes(W, T)
    return TernaryFit(T, alpha, mu), trace


def block_atq(Z: Tensor, *, block_size: int = 128, iters: int = 10) -> tuple[Tensor, Tensor]:
    """ATQ of every (row, block of ``block_size`` columns) of Z (…, n, m): codes from ITF with
    PT²-LLM's rule (no gradient), then the exact grid :func:`grid_given_codes`, which is
    differentiable in Z. Returns the dequantized Q(Z) and the codes, both shaped like Z."""
    values, codes = [], []
    for start in range(0, Z.shape[-1], block_size):
        block = Z[..., start : start + block_size]
        rows = block.reshape(-1, block.shape[-1])
        T = itf(rows.detach(), iters=iters, rule="lsq")[0].codes
        alpha, mu = grid_given_codes(rows, T)
        values.append((alpha[:, None] * T.to(rows.dtype) + mu[:, None]).reshape(block.shape))
        codes.append(T.reshape(block.shape))
    return torch.cat(values, dim=-1), torch.cat(codes, dim=-1)


def refit_metric(W: Tensor, T: Tensor, M: Tensor) -> tuple[Tensor, Tensor]:
    """Exact refit of (α, μ) with T frozen in the input metric M:

    min_{α,μ} tr(E M Eᵀ), E = W − diag(α)T − μ1ᵀ, i.e. per row the 2×2 system
    [t M tᵀ, t M 1; 1ᵀ M tᵀ, 1ᵀ M 1] [α; μ] = [w M tᵀ; w M 1].
    Singular rows (codes constant along the row) keep α = 0 and μ = w M 1 / 1ᵀ M 1.
    """
    W, M = _f64(W), _f64(M)
    Tf = T.to(W.dtype)
    TM = Tf @ M
    m1 = M.sum(dim=1)  # M 1
    a11 = (TM * Tf).sum(1)
    a12 = Tf @ m1
    a22 = m1.sum()
    b1 = (W @ M * Tf).sum(1)
    b2 = W @ m1
    det = a11 * a22 - a12 * a12
    ok = det > 1e-10 * (a11 * a22).clamp(min=1e-300)
    safe = torch.where(ok, det, torch.ones_like(det))
    alpha = torch.where(ok, (b1 * a22 - a12 * b2) / safe, torch.zeros_like(det))
    const = torch.where(a22 > 0, b2 / a22.clamp(min=1e-300), W.mean(dim=1))
    mu = torch.where(ok, (a11 * b2 - a12 * b1) / safe, const)
    return alpha, mu


def weight_error(W: Tensor, W_hat: Tensor) -> float:
    """E_w = ‖W − Ŵ‖²_F."""
    return float(((_f64(W) - _f64(W_hat)) ** 2).sum())


def output_error(W: Tensor, W_hat: Tensor, M: Tensor) -> float:
    """E_x = tr(E M Eᵀ), E = W − Ŵ: the layer-output error ‖XWᵀ − XŴᵀ‖² when M = XᵀX."""
    E = _f64(W) - _f64(W_hat)
    return float(((E @ _f64(M)) * E).sum())
