"""Quantized activations and the pure-torch reference kernels of the ternary linear.

Weights are in the packed layout of :mod:`twla.kernels.packing`.

Activations are quantized per token and held as int8: x̂_m = s_m (q_m − z_m), with
q ∈ [−2^{b−1}, 2^{b−1} − 1] for b ≤ 8 (asymmetric codes shifted by 2^{b−1}; z = 0 when
symmetric). Per group g, with A_gmn = Σ_{k∈g} q_mk c_kn and R_gm = Σ_{k∈g} q_mk,

    y_mn = s_m [ Σ_g ( α_gn A_gmn + (μ_gn − α_gn) R_gm ) − z_m Σ_k Ŵ_nk ],

an exact integer matmul of q with the codes, a rank-1 offset term per group, and, for
asymmetric activations, one more rank-1 term with the weight's row sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from twla.kernels.packing import PackedTernary, dequantize, unpack_codes
from twla.kernels.uniform import quantize_codes, uniform_grid


@dataclass
class QuantizedActivations:
    """Per-token quantized activations x̂ = s (q − z) and their per-group row sums."""

    q: Tensor  # int8 (M, K)
    scale: Tensor  # float32 (M,)
    zero: Tensor  # float32 (M,), integer-valued; 0 when symmetric
    rowsum: Tensor  # int32 (M, G): Σ_{k∈g} q_mk
    symmetric: bool

    def to(self, device: torch.device | str) -> QuantizedActivations:
        return QuantizedActivations(
            self.q.to(device), self.scale.to(device), self.zero.to(device), self.rowsum.to(device), self.symmetric
        )

    def dequantize(self) -> Tensor:
        """x̂ in float32, with exactly the rounding of :func:`twla.kernels.uniform.fake_quantize`."""
        return self.scale[:, None] * (self.q.float() - self.zero[:, None])


def group_sums(q: Tensor, group_size: int) -> Tensor:
    """R_gm = Σ_{k∈g} q_mk as int32 (M, G); the last group may be short."""
    M, K = q.shape
    G = -(-K // group_size)
    padded = F.pad(q.to(torch.int32), (0, G * group_size - K))
    return padded.view(M, G, group_size).sum(-1, dtype=torch.int32)


def weight_sums(w: PackedTernary) -> Tensor:
    """Σ_k Ŵ_nk = Σ_g (α_gn Σ_{k∈g} t_kn + μ_gn |g|) over the real inputs (N,), float32:
    the coefficient of the zero-point term."""
    t = group_sums(unpack_codes(w.packed, w.in_features, w.group_size), w.group_size).T.double()  # (G, N)
    size = torch.full((w.groups,), float(w.group_size), dtype=torch.float64, device=t.device)
    size[-1] = w.in_features - w.group_size * (w.groups - 1)
    return (w.alpha.double() * t + w.mu.double() * size[:, None]).sum(0).float()


def quantize_activations(
    x: Tensor,
    bits: int,
    *,
    clip: float = 1.0,
    symmetric: bool = False,
    group_size: int = 128,
    perm: Tensor | None = None,
) -> QuantizedActivations:
    """Per-token quantization of x (M, K), columns optionally gathered by ``perm`` first.

    The grid is that of :func:`twla.kernels.uniform.uniform_grid` (clipping ratio ``clip``);
    asymmetric codes in [0, 2^b − 1] and their zero point are shifted by 2^{b−1} to fit int8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"the integer activation path supports 2..8 bits, got {bits}")
    xf = x.float() if perm is None else x.float()[:, perm]
    scale, zero = uniform_grid(xf, bits, clip=clip, symmetric=symmetric)
    shift = 0 if symmetric else 2 ** (bits - 1)
    q = (quantize_codes(xf, scale, zero, bits=bits, symmetric=symmetric) - shift).to(torch.int8)
    zero = (zero - shift).squeeze(-1)
    return QuantizedActivations(q, scale.squeeze(-1), zero, group_sums(q, group_size), symmetric)


def matmul_a16(x: Tensor, w: PackedTernary) -> Tensor:
    """Reference W1.58A16: y = x Ŵᵀ, computed in float32, returned in x's dtype."""
    return (x.float() @ dequantize(w).T).to(x.dtype)


def group_accumulator(q: Tensor, w: PackedTernary, g: int) -> Tensor:
    """The exact integer part of group g: A_gmn = Σ_{k∈g} q_mk c_kn (int32 (M, N), c = t + 1),
    computed in float64 (exact: |A| < 2^53), so it runs on any device."""
    cols = slice(g * w.group_size, (g + 1) * w.group_size)
    c = unpack_codes(w.packed, w.in_features, w.group_size)[:, cols].double() + 1  # (N, group)
    return (q[:, cols].double() @ c.T).to(torch.int32)


def matmul_int(a: QuantizedActivations, w: PackedTernary) -> Tensor:
    """Reference integer-activation path, float32:
    y_mn = s_m [Σ_g (α_gn A_gmn + (μ_gn − α_gn) R_gm) − z_m Σ_k Ŵ_nk]."""
    y = torch.zeros(a.q.shape[0], w.out_features, dtype=torch.float64, device=a.q.device)
    for g in range(w.groups):
        A, R = group_accumulator(a.q, w, g).double(), a.rowsum[:, g, None].double()
        y += w.alpha[g].double() * A + (w.mu[g] - w.alpha[g]).double() * R
    return (a.scale[:, None].double() * (y - a.zero[:, None].double() * weight_sums(w)[None, :].double())).float()
