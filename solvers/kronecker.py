"""Kronecker-structured orthogonal rotations R = R₁ ⊗ R₂.

A token x ∈ ℝ^m with m = m₁·m₂ is rotated without forming R: reshape x row-major to
X̃ ∈ ℝ^{m₁×m₂}; then x R = vec(R₁ᵀ X̃ R₂) and x Rᵀ = vec(R₁ X̃ R₂ᵀ), at a cost of
m(m₁ + m₂) per token instead of m². The same identity rotates weight rows (W R) and
input statistics (Rᵀ S R).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


class FactorWarning(UserWarning):
    """A dimension without a balanced Kronecker factorization (the rotation still works)."""


def kron_factors(m: int, factors: tuple[int, int] | None = None) -> tuple[int, int]:
    """Factor sizes (m₁, m₂) with m₁·m₂ = m and m₁ ≤ m₂ as close to √m as m allows.

    576 → 24×24, 1536 → 32×48, 4096 → 64×64, 11008 → 86×128. A prime m gets one dense
    m×m factor (1, m); a very unbalanced split is kept but reported. ``factors``
    overrides the choice and is checked.
    """
    if m < 1:
        raise ValueError(f"cannot rotate a dimension of size {m}")
    if factors is not None:
        m1, m2 = (int(f) for f in factors)
        if m1 < 1 or m2 < 1 or m1 * m2 != m:
            raise ValueError(f"Kronecker factors {m1}×{m2} do not multiply to the dimension {m}")
        return m1, m2
    m1 = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    m2 = m // m1
    if m1 == 1 and m > 1:
        warnings.warn(
            f"dimension {m} is prime: no Kronecker factorization, using one dense {m}×{m} factor "
            f"(cost {m} per element instead of ~{2 * math.isqrt(m)})",
            FactorWarning,
            stacklevel=2,
        )
    elif m2 > 16 * m1:
        warnings.warn(
            f"dimension {m} only factors unevenly as {m1}×{m2}; the rotation costs {m1 + m2} per element",
            FactorWarning,
            stacklevel=2,
        )
    return m1, m2


def kron_apply(x: Tensor, R1: Tensor, R2: Tensor) -> Tensor:
    """x R for R = R₁ ⊗ R₂, over the last dimension of x: vec(R₁ᵀ X̃ R₂).

    R1, R2 may carry batch dimensions that broadcast against x's leading dimensions
    (with the token dimension of x matched by a size-1 dimension).
    """
    m1, m2 = R1.shape[-1], R2.shape[-1]
    X = x.reshape(*x.shape[:-1], m1, m2)
    return (R1.mT @ X @ R2).reshape(x.shape)


def kron_apply_t(x: Tensor, R1: Tensor, R2: Tensor) -> Tensor:
    """x Rᵀ for R = R₁ ⊗ R₂ (the inverse rotation): vec(R₁ X̃ R₂ᵀ)."""
    m1, m2 = R1.shape[-1], R2.shape[-1]
    X = x.reshape(*x.shape[:-1], m1, m2)
    return (R1 @ X @ R2.mT).reshape(x.shape)


def rotate_metric(S: Tensor, R1: Tensor, R2: Tensor) -> Tensor:
    """Rᵀ S R: the statistics of the rotated inputs X R when S = XᵀX."""
    return kron_apply(kron_apply(S, R1, R2).mT, R1, R2).mT


def random_orthogonal(n: int, generator: torch.Generator, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """A Haar-random orthogonal n×n matrix (QR of a Gaussian matrix with the sign fix)."""
    Q, Rr = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(Rr))).to(dtype).contiguous()


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q_ij = χ(j − i) with χ the quadratic character of GF(q), q prime."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> Tensor | None:
    """Paley's constructions: order q+1 (q ≡ 3 mod 4) or 2(q+1) (q ≡ 1 mod 4), q prime."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + S
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> Tensor | None:
    """A Hadamard matrix of order n (entries ±1, HHᵀ = nI), or None if none is constructed.

    Sylvester doubling on top of 1, 2 or a Paley matrix; covers every n = 2^k·p with a
    Paley order p (e.g. 12, 20, 24, 28, 36, 48), but not n ≢ 0 (mod 4) beyond 1, 2.
    """
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    for k in range(power.bit_length()):  # base = n / 2^k, smallest power of two first
        base = n >> k
        H = torch.ones(1, 1, dtype=torch.float64) if base == 1 else _paley(base)
        if H is None:
            continue
        for _ in range(k):
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        if torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)):
            return H
    return None


def random_hadamard(n: int, generator: torch.Generator, *, dtype: torch.dtype = torch.float64) -> Tensor | None:
    """diag(s) H / √n with random signs s (QuaRot's randomized Hadamard), or None."""
    H = hadamard(n)
    if H is None:
        return None
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * H / math.sqrt(n)).to(dtype)
