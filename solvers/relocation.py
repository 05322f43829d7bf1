"""E2M-ATQ stage 2, part 1: relocation of a site's rotation on the Stiefel manifold.

For the linears W_k (n_k×m) reading one input with statistics S = XᵀX, and R = R₁ ⊗ R₂,

    min_{R₁, R₂ orthogonal}  Σ_k ‖X W_kᵀ − (XR) Q(W_k R)ᵀ‖²_F / Σ_k ‖X W_kᵀ‖²_F
                          =  Σ_k tr(D_k RᵀSR D_kᵀ) / Σ_k tr(W_k S W_kᵀ),   D_k = W_k R − Q(W_k R),

where Q is the asymmetric ternary quantizer per (row, block of columns) with its
closed-form grid (:func:`~twla.solvers.ternary.block_atq`): at every step the codes are
re-assigned by ITF on the current rotated weight (held fixed), and the exact grid
(α, μ) carries the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twla.solvers.kronecker import kron_apply, rotate_metric
from twla.solvers.stiefel import FactorResult, StiefelSolver, optimize_factors
from twla.solvers.ternary import block_atq


def relocation_loss(
    weights: list[Tensor], S: Tensor, R1: Tensor, R2: Tensor, *, block_size: int = 128, iters: int = 3
) -> Tensor:
    """Relative output error of the ternarized, rotated site (the objective above)."""
    S_R = rotate_metric(S, R1, R2)
    err = S.new_zeros(())
    energy = S.new_zeros(())
    for W in weights:
        Z = kron_apply(W, R1, R2)
        D = Z - block_atq(Z, block_size=block_size, iters=iters)[0]
        err = err + ((D @ S_R) * D).sum()
        energy = energy + ((W @ S) * W).sum()
    return err / energy.clamp(min=1e-30)


def relocate(
    weights: list[Tensor],
    S: Tensor,
    R1: Tensor,
    R2: Tensor,
    *,
    solver: StiefelSolver = "riemannian-adam",
    steps: int = 25,
    lr: float = 5e-3,
    block_size: int = 128,
) -> FactorResult:
    """Refine the site's factors (R₁, R₂) against its ternarized output error.

    weights: the site's linears in the *original* basis; S: their input statistics.
    Runs in float32 on S's device; returns float64 factors and the loss trace.
    """
    Ws = [W.detach().to(S.device, torch.float32) for W in weights]
    Sf = S.detach().to(torch.float32)

    def objective(Q1: Tensor, Q2: Tensor) -> Tensor:
        return relocation_loss(Ws, Sf, Q1, Q2, block_size=block_size)

    return optimize_factors(objective, R1.to(S.device), R2.to(S.device), solver=solver, steps=steps, lr=lr)
