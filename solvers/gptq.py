"""Block-wise GPTQ error compensation for any block quantizer.

Problem: min_Ŵ ‖X Wᵀ − X Ŵᵀ‖²_F = tr(E H Eᵀ), E = W − Ŵ, H = S + λ·mean(diag S)·I,
where Ŵ is quantized one block of columns at a time.

Each block Q_b is fitted given its metric (below) and, inside the fit, may be rounded
column by column with GPTQ's intra-block error feedback (:func:`sequential_round`);
then the columns not yet quantized absorb the block's final error optimally (the
Optimal Brain Surgeon update). With H⁻¹ restricted to the remaining columns,
P = (H_rem)⁻¹, block b and rest r:

    W_r ← W_r − E_b P_bb⁻¹ P_br,        P_rr ← P_rr − P_rb P_bb⁻¹ P_br.

This equals GPTQ's lazy batch update for the block's final values, written as one
block solve; keeping P (instead of a fixed Cholesky factor) lets the block order be
chosen on the fly (SSR). The error the block contributes to the final output error
is tr(E_b M_b E_bᵀ) with M_b = P_bb⁻¹, so the block fit is solved in that metric;
without compensation the metric is H_bb.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# fit(W_block, metric M_b, block of H⁻¹ or None without compensation)
#   -> (Q_block, per-stage dequantized fits {stage name: Ŵ_block}, payload)
BlockFit = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, dict[str, Tensor], object]]


@dataclass
class GPTQResult:
    """Quantized weight (original column order), blocks in quantization order, diagnostics."""

    weight: Tensor
    blocks: list[Tensor]
    payloads: list[object]
    stage_weight_error: dict[str, float] = field(default_factory=dict)
    stage_output_error: dict[str, float] = field(default_factory=dict)


def damped_hessian(S: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """H = S + damp·mean(diag S)·I with dead inputs (S_jj = 0) given H_jj = 1.

    Returns H (float64) and the mask of dead input columns.
    """
    H = S.detach().to(torch.float64, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    return H, dead


def ssr_block(W: Tensor, size: int) -> Tensor:
    """Structural Similarity Reordering: the `size` columns of W with the highest cosine
    similarity to the mean of all columns of W (returned as sorted positions)."""
    mean = W.mean(dim=1, keepdim=True)
    sim = torch.nn.functional.cosine_similarity(W, mean.expand_as(W), dim=0)
    return torch.sort(torch.topk(sim, size).indices).values


def sequential_round(Wb: Tensor, Pbb: Tensor, round_column: Callable[[Tensor, int], Tensor]) -> Tensor:
    """GPTQ's column loop inside a block: round column j of the (compensated) block with
    ``round_column(w_j, j)``, then spread its error over the block's later columns:
    e_j = (w_j − q_j)/U_jj, W[:, j+1:] −= e_j U_{j, j+1:}, U the upper Cholesky factor of
    the block's H⁻¹ (``Pbb``). Returns the rounded block."""
    U = torch.linalg.cholesky(Pbb, upper=True)
    W = Wb.clone()
    Q = torch.empty_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = round_column(W[:, j], j)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return Q


def gptq(
    W: Tensor,
    S: Tensor,
    fit: BlockFit,
    *,
    block_size: int = 128,
    compensate: bool = True,
    reorder: bool = False,
    damp: float = 0.01,
) -> GPTQResult:
    """Quantize W (n×m) block by block against input statistics S (m×m).

    Per-stage diagnostics are Σ_b ‖E_b‖²_F and Σ_b tr(E_b M_b E_bᵀ) over the blocks'
    stage fits: with compensation the final-stage sum equals tr(E H Eᵀ) exactly.
    """
    n, m = W.shape
    if S.shape != (m, m):
        raise ValueError(f"input statistics have shape {tuple(S.shape)}, expected {(m, m)}")
    H, dead = damped_hessian(S, damp)
    Wc = W.detach().to(S.device, torch.float64, copy=True)
    Wc[:, dead] = 0.0
    P = torch.cholesky_inverse(torch.linalg.cholesky(H)) if compensate else None

    device = Wc.device
    remaining = torch.arange(m, device=device)
    Q = torch.empty_like(Wc)
    result = GPTQResult(Q, [], [])
    while remaining.numel():
        size = min(block_size, remaining.numel())
        pos = ssr_block(Wc[:, remaining], size) if reorder else torch.arange(size, device=device)
        keep = torch.ones(remaining.numel(), dtype=torch.bool, device=device)
        keep[pos] = False
        rest = keep.nonzero().squeeze(1)
        cols = remaining[pos]

        Wb = Wc[:, cols]
        if compensate:
            Pbb = P[pos][:, pos]
            metric = torch.linalg.inv(Pbb)
            metric = 0.5 * (metric + metric.T)
        else:
            Pbb, metric = None, H[cols][:, cols]
        Qb, stages, payload = fit(Wb, metric, Pbb)
        for name, Wq in stages.items():
            E = Wb - Wq.to(torch.float64)
            result.stage_weight_error[name] = result.stage_weight_error.get(name, 0.0) + float((E**2).sum())
            result.stage_output_error[name] = result.stage_output_error.get(name, 0.0) + float(((E @ metric) * E).sum())
        Q[:, cols] = Qb.to(torch.float64)
        result.blocks.append(cols)
        result.payloads.append(payload)

        if compensate and rest.numel():
            Pbr = P[pos][:, rest]
            G = torch.linalg.solve(Pbb, Pbr)
            rem_cols = remaining[rest]
            Wc[:, rem_cols] -= (Wb - Qb.to(torch.float64)) @ G
            P = P[rest][:, rest] - Pbr.T @ G
        remaining = remaining[rest]
    return result
