"""Packed ternary weights, quantized activations, and the pure-torch reference kernels.

Storage: codes c = t + 1 ∈ {0, 1, 2}, 2 bits each, four per byte along the input
dimension K (k = 4r + j sits in bits 2j..2j+1 of byte r), laid out K-major as
(⌈K/4⌉, N) so a tile of outputs is contiguous; padding uses code 1 (t = 0). Scales
α and offsets μ are per (group of `group_size` input columns, output row): (G, N).

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

from twla.solvers.uniform import quantize_codes, uniform_grid

PAD_BYTE = 0x55  # four codes 1, i.e. t = 0


@dataclass
class PackedTernary:
    """A ternary weight (N outputs, K inputs) in the kernel layout."""

    packed: Tensor  # uint8 (⌈K/4⌉, N)
    alpha: Tensor  # float32 (G, N)
    mu: Tensor  # float32 (G, N)
    in_features: int
    group_size: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def groups(self) -> int:
        return self.alpha.shape[0]

    def to(self, device: torch.device | str) -> PackedTernary:
        return PackedTernary(
            self.packed.to(device), self.alpha.to(device), self.mu.to(device), self.in_features, self.group_size
        )


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
        """x̂ in float32, with exactly the rounding of :func:`twla.solvers.uniform.fake_quantize`."""
        return self.scale[:, None] * (self.q.float() - self.zero[:, None])


def pack_codes(T: Tensor) -> Tensor:
    """Ternary codes T (N, K) in {−1, 0, 1} → uint8 (⌈K/4⌉, N), code t+1 of k = 4r+j in bits 2j..2j+1 of row r."""
    N, K = T.shape
    Kp = -(-K // 4)
    c = torch.ones(N, 4 * Kp, dtype=torch.uint8, device=T.device)
    c[:, :K] = (T.to(torch.int16) + 1).to(torch.uint8)
    c = c.view(N, Kp, 4)
    packed = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return packed.T.contiguous()


def unpack_codes(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 ternary codes (N, K)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    c = (packed.T[..., None] >> shifts) & 3  # (N, Kp, 4)
    return (c.reshape(packed.shape[1], -1)[:, :in_features].to(torch.int8) - 1).contiguous()


def pack_ternary(codes: Tensor, alpha: Tensor, mu: Tensor, group_size: int) -> PackedTernary:
    """Pack codes (N, K) with per-(row, group) α, μ of shape (N, G) into the kernel layout."""
    N, K = codes.shape
    if group_size < 4 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")
    if alpha.shape != (N, -(-K // group_size)) or mu.shape != alpha.shape:
        raise ValueError(
            f"α, μ must have shape (N, ⌈K/group_size⌉) = {(N, -(-K // group_size))}, got {tuple(alpha.shape)}"
        )
    return PackedTernary(pack_codes(codes), alpha.T.float().contiguous(), mu.T.float().contiguous(), K, group_size)


def dequantize(w: PackedTernary) -> Tensor:
    """Ŵ (N, K) in float32: α_gn t_kn + μ_gn for k in group g."""
    group = torch.arange(w.in_features, device=w.packed.device) // w.group_size
    t = unpack_codes(w.packed, w.in_features).float()
    return w.alpha.T[:, group] * t + w.mu.T[:, group]


def group_sums(q: Tensor, group_size: int) -> Tensor:
    """R_gm = Σ_{k∈g} q_mk as int32 (M, G); the last group may be short."""
    M, K = q.shape
    G = -(-K // group_size)
    padded = F.pad(q.to(torch.int32), (0, G * group_size - K))
    return padded.view(M, G, group_size).sum(-1, dtype=torch.int32)


def weight_sums(w: PackedTernary) -> Tensor:
    """Σ_k Ŵ_nk = Σ_g (α_gn Σ_{k∈g} t_kn + μ_gn |g|) over the real inputs (N,), float32:
    the coefficient of the zero-point term."""
    t = group_sums(unpack_codes(w.packed, w.in_features), w.group_size).T.double()  # (G, N)
    size = torch.full((w.groups,), float(w.group_size), dtype=torch.float64, device=t.device)
    size[-1] = w.in_features - w.group_size * (w.groups - 1)
    return (w.alpha.double() * t + w.mu.double() * size[:, None]).sum(0).float()


def quantize_activations(
    x: Tensor,
    bits: int,
    clip: float = 1.0,
    symmetric: bool = False,
    group_size: int = 128,
    perm: Tensor | None = None,
) -> QuantizedActivations:
    """Per-token quantization of x (M, K), columns optionally gathered by ``perm`` first.

    The grid is that of :func:`twla.solvers.uniform.uniform_grid` (clipping ratio ``clip``);
    asymmetric codes in [0, 2^b − 1] and their zero point are shifted by 2^{b−1} to fit int8.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"the integer activation path supports 2..8 bits, got {bits}")
    xf = x.float() if perm is None else x.float()[:, perm]
    scale, zero = uniform_grid(xf, bits, clip, symmetric)
    shift = 0 if symmetric else 2 ** (bits - 1)
    q = (quantize_codes(xf, scale, zero, bits, symmetric) - shift).to(torch.int8)
    zero = (zero - shift).squeeze(-1)
    return QuantizedActivations(q, scale.squeeze(-1), zero, group_sums(q, group_size), symmetric)


def matmul_a16(x: Tensor, w: PackedTernary) -> Tensor:
    """Reference W1.58A16: y = x Ŵᵀ, computed in float32, returned in x's dtype."""
    return (x.float() @ dequantize(w).T).to(x.dtype)


def group_accumulator(q: Tensor, w: PackedTernary, g: int) -> Tensor:
    """The exact integer part of group g: A_gmn = Σ_{k∈g} q_mk c_kn (int32 (M, N), c = t + 1),
    computed in float64 (exact: |A| < 2^53), so it runs on any device."""
    cols = slice(g * w.group_size, (g + 1) * w.group_size)
    c = unpack_codes(w.packed, w.in_features)[:, cols].double() + 1  # (N, group)
    return (q[:, cols].double() @ c.T).to(torch.int32)


def matmul_int(a: QuantizedActivations, w: PackedTernary) -> Tensor:
    """Reference integer-activation path, float32:
    y_mn = s_m [Σ_g (α_gn A_gmn + (μ_gn − α_gn) R_gm) − z_m Σ_k Ŵ_nk]."""
    y = torch.zeros(a.q.shape[0], w.out_features, dtype=torch.float64, device=a.q.device)
    for g in range(w.groups):
        A, R = group_accumulator(a.q, w, g).double(), a.rowsum[:, g, None].double()
        y += w.alpha[g].double() * A + (w.mu[g] - w.alpha[g]).double() * R
    return (a.scale[:, None].double() * (y - a.zero[:, None].double() * weight_sums(w)[None, :].double())).float()
