"""Optimization over pairs of orthogonal factors (R₁, R₂) ∈ O(m₁) × O(m₂).

    min_{R₁ᵀR₁ = I, R₂ᵀR₂ = I}  f(R₁, R₂)

Interchangeable solvers:
- ``riemannian-adam`` / ``riemannian-sgd``: geoopt ``ManifoldParameter`` on
  ``geoopt.Stiefel()``; each step moves along the manifold and retracts onto it.
- ``cayley-adam`` (TWLA's own): R = R⁰·C(A), C(A) = (I − A)⁻¹(I + A) with A = B − Bᵀ
  skew-symmetric, and Adam on the free matrix B (starting at B = 0, i.e. R = R⁰).
- ``fixed``: no learning; the starting factors are returned.

Factors may carry leading batch dimensions: f returns one loss per batch element, the
elements are optimized jointly (their losses summed) and each keeps its best iterate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

StiefelSolver = Literal["riemannian-adam", "riemannian-sgd", "cayley-adam", "fixed"]
STIEFEL_SOLVERS: tuple[str, ...] = get_args(StiefelSolver)

Objective = Callable[[Tensor, Tensor], Tensor]


@dataclass
class FactorResult:
    """Optimized factors (float64, orthogonal to float tolerance) and the loss trace.

    losses[k] is the summed loss over the batch before step k; the last entry is the
    loss of the returned (best) factors.
    """

    R1: Tensor
    R2: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def improvement(self) -> float:
        return self.losses[0] - self.losses[-1] if self.losses else 0.0


def project_orthogonal(R: Tensor) -> Tensor:
    """The nearest orthogonal matrix (polar factor U Vᵀ of R = U Σ Vᵀ), in float64."""
    U, _, Vh = torch.linalg.svd(R.to(torch.float64))
    return U @ Vh


def cayley(B: Tensor) -> Tensor:
    """C(A) = (I − A)⁻¹(I + A) for A = B − Bᵀ: orthogonal for every B."""
    A = B - B.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    return torch.linalg.solve(eye - A, eye + A)


def optimize_factors(
    objective: Objective,
    R1: Tensor,
    R2: Tensor,
    *,
    solver: StiefelSolver = "riemannian-adam",
    steps: int = 100,
    lr: float = 1e-2,
    dtype: torch.dtype = torch.float32,
) -> FactorResult:
    """Minimize ``objective(R1, R2)`` (one loss per batch element) over orthogonal factors."""
    if solver not in STIEFEL_SOLVERS:
        raise ValueError(f"unknown Stiefel solver {solver!r}; choose one of {', '.join(STIEFEL_SOLVERS)}")
    if steps < 0 or lr <= 0:
        raise ValueError("steps must be ≥ 0 and lr > 0")
    start1, start2 = R1.detach().to(dtype), R2.detach().to(dtype)
    if solver in ("riemannian-adam", "riemannian-sgd"):
        import geoopt  # imported when used: configurations name these solvers without loading them

        P1 = geoopt.ManifoldParameter(start1.clone(), manifold=geoopt.Stiefel())
        P2 = geoopt.ManifoldParameter(start2.clone(), manifold=geoopt.Stiefel())
        params = [P1, P2]
        if solver == "riemannian-adam":
            opt = geoopt.optim.RiemannianAdam(params, lr=lr)
        else:
            opt = geoopt.optim.RiemannianSGD(params, lr=lr, momentum=0.9)

        def current() -> tuple[Tensor, Tensor]:
            return P1, P2

    else:
        B1 = torch.zeros_like(start1, requires_grad=True)
        B2 = torch.zeros_like(start2, requires_grad=True)
        params = [B1, B2]
        opt = torch.optim.Adam(params, lr=lr)

        def current() -> tuple[Tensor, Tensor]:
            return start1 @ cayley(B1), start2 @ cayley(B2)

    best1, best2 = start1.clone(), start2.clone()
    best_loss: Tensor | None = None
    losses: list[float] = []
    for step in range(steps + 1):
        with torch.enable_grad():  # callers may run under torch.no_grad()
            Q1, Q2 = current()
            per_item = objective(Q1, Q2)
            total = per_item.sum()
        detached = per_item.detach().reshape(-1)
        losses.append(float(detached.sum()))
        better = torch.ones_like(detached, dtype=torch.bool) if best_loss is None else detached < best_loss
        best_loss = detached.clone() if best_loss is None else torch.where(better, detached, best_loss)
        mask = better.reshape(per_item.shape + (1, 1))
        best1 = torch.where(mask, Q1.detach(), best1)
        best2 = torch.where(mask, Q2.detach(), best2)
        if step == steps or solver == "fixed":
            break
        opt.zero_grad()
        total.backward()
        opt.step()
    losses.append(float(best_loss.sum()))
    return FactorResult(project_orthogonal(best1), project_orthogonal(best2), losses)
