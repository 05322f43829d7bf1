"""KOTMS: Kronecker orthogonal tri-modal shaping of weights.

For a weight W (n×m) and R = R₁ ⊗ R₂, the rotated rows z_i = w_i R, centred per row,
with c_i = mean_j |z_ij| (held fixed) and σ_i = 0.25·c_i, are scored by the negative
log-likelihood of a three-component mixture with equal weights,

    L_tri = −(1/nm) Σ_ij log Σ_{k∈{−1,0,+1}} ⅓ φ(z_ij; k·c_i, σ_i²),

plus a balance term λ Σ_k (r̄_k − ⅓)² on the mean responsibilities r̄_k, which keeps the
solution from collapsing onto the zero component. Minimizing over (R₁, R₂) on the
Stiefel manifold makes the rotated weights cluster at {−c, 0, +c}: ternary-friendly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from twla.kernels.uniform import fake_quantize
from twla.solvers.kronecker import kron_apply
from twla.solvers.stiefel import FactorResult, StiefelSolver, optimize_factors
from twla.solvers.ternary import block_atq

_LOG_NORM = 0.5 * math.log(2 * math.pi) + math.log(3.0)


def trimodal_terms(Z: Tensor) -> tuple[Tensor, Tensor]:
    """Per matrix: the mixture NLL (mean over entries) and the mean responsibilities (…, 3).

    Z: (…, n, m) rotated weight rows. With u = z/σ the centres sit at u ∈ {−4, 0, 4}, so
    log Σ_k exp(−(u − 4k)²/2) = −u²/2 + log(1 + e^a + e^{−a−16}), a = 4|u| − 8: one
    log-sum-exp per entry instead of three Gaussian terms.
    """
    Z = Z - Z.mean(dim=-1, keepdim=True)
    c = Z.abs().mean(dim=-1, keepdim=True).detach().clamp(min=1e-12)
    u = Z * (4.0 / c)
    a = 4.0 * u.abs() - 8.0
    lse = torch.logaddexp(F.softplus(a), -a - 16.0)
    nll = (0.5 * u * u - lse).mean(dim=(-2, -1)) + torch.log(0.25 * c).mean(dim=(-2, -1)) + _LOG_NORM
    zero = torch.exp(-lse)  # responsibility of the centre 0
    near = torch.exp(a - lse)  # of the centre on u's side
    far = 1.0 - zero - near
    pos = torch.where(u > 0, near, far).mean(dim=(-2, -1))
    neg = torch.where(u > 0, far, near).mean(dim=(-2, -1))
    return nll, torch.stack([neg, zero.mean(dim=(-2, -1)), pos], dim=-1)


def trimodal_loss(Z: Tensor, balance: float = 0.1) -> Tensor:
    """L_tri + λ·Σ_k (r̄_k − ⅓)², one value per matrix in the batch."""
    nll, resp = trimodal_terms(Z)
    return nll + balance * ((resp - 1.0 / 3.0) ** 2).sum(dim=-1)


def trimodality(Z: Tensor, *, block_size: int = 128, iters: int = 6) -> tuple[Tensor, Tensor]:
    """Tri-modality scores per matrix (…, n, m): the relative ternary fit error
    ‖Z − ATQ(Z)‖_F / ‖Z‖_F of per-(row, block) ITF, and the fraction of zero codes."""
    Z = Z.detach().to(torch.float64)
    Q, codes = block_atq(Z, block_size=block_size, iters=iters)
    err = ((Z - Q) ** 2).sum(dim=(-2, -1))
    norm = (Z**2).sum(dim=(-2, -1)).clamp(min=1e-300)
    return (err / norm).sqrt().cpu(), (codes == 0).double().mean(dim=(-2, -1)).cpu()


def activation_noise(XR: Tensor, bits: int = 4) -> Tensor:
    """Expected relative noise of per-token b-bit min-max quantization of rotated inputs,
    Σ_t m·Δ_t²/12 / Σ_t ‖x_t R‖² with Δ_t = (max − min)/(2^b − 1), per batch element (…, N, m)."""
    span = XR.amax(dim=-1) - XR.amin(dim=-1)
    noise = XR.shape[-1] * (span / (2**bits - 1)) ** 2 / 12
    return noise.sum(dim=-1) / (XR**2).sum(dim=(-2, -1)).clamp(min=1e-30)


def learn_kotms(
    W: Tensor,
    R1: Tensor,
    R2: Tensor,
    *,
    solver: StiefelSolver = "riemannian-adam",
    steps: int = 100,
    lr: float = 1e-2,
    balance: float = 0.1,
    X: Tensor | None = None,
    activation_weight: float = 0.0,
    activation_bits: int = 4,
) -> FactorResult:
    """Learn (R₁, R₂) minimizing the tri-modal loss of W R for a batch of weights, plus
    optionally γ·activation_noise(X R) on calibration inputs X (an extension of the tri-modal loss).

    W: (L, n, m) — one weight per batch element (e.g. one site in each of L layers,
    its linears' rows stacked); R1: (L, m₁, m₁), R2: (L, m₂, m₂) starting factors;
    X: (L, N, m) inputs of each element, used when ``activation_weight`` > 0.
    """
    Wf = W.detach().to(torch.float32)
    Xf = None if X is None or activation_weight <= 0 else X.detach().to(torch.float32)

    def objective(Q1: Tensor, Q2: Tensor) -> Tensor:
        loss = trimodal_loss(kron_apply(Wf, Q1[:, None], Q2[:, None]), balance)
        if Xf is not None:
            XR = kron_apply(Xf, Q1[:, None], Q2[:, None])
            loss = loss + activation_weight * activation_noise(XR, activation_bits)
        return loss

    return optimize_factors(objective, R1, R2, solver=solver, steps=steps, lr=lr)


ERROR_KINDS = ("weight", "activation", "combined")


@torch.no_grad()
def site_errors(
    W: Tensor, X: Tensor, R1: Tensor, R2: Tensor, *, bits: int = 16, symmetric: bool = False, block_size: int = 128
) -> dict[str, float]:
    """Relative output errors of one site under the rotation R = R₁ ⊗ R₂ on inputs X, with
    Y = X Wᵀ, T̂ = ATQ(W R) per (row, block) and Q_b per-token b-bit min-max quantization:

        weight      ‖X R T̂ᵀ − Y‖² / ‖Y‖²
        activation  ‖Q_b(X R)(W R)ᵀ − Y‖² / ‖Y‖²
        combined    ‖Q_b(X R) T̂ᵀ − Y‖² / ‖Y‖²

    W: (n, m) the site's stacked weights, X: (N, m). A proxy of what the layer-wise solve
    will face (no error compensation, no clipping), equal for every rotation it compares.
    """
    W, X = W.double(), X.double()
    Y = X @ W.T
    WR = kron_apply(W, R1.double(), R2.double())
    XR = kron_apply(X, R1.double(), R2.double())
    T = block_atq(WR, block_size=block_size, iters=6)[0]
    XQ = fake_quantize(XR, bits, symmetric=symmetric)
    norm = (Y**2).sum().clamp(min=1e-300)
    outputs = {"weight": XR @ T.T, "activation": XQ @ WR.T, "combined": XQ @ T.T}
    return {kind: float(((out - Y) ** 2).sum() / norm) for kind, out in outputs.items()}
