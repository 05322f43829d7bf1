"""Packed ternary weights and the pure-torch reference kernels (DESIGN §7).

Storage: codes c = t + 1 ∈ {0, 1, 2}, 2 bits each, four per byte along the input
dimension K (k = 4r + j sits in bits 2j..2j+1 of byte r), laid out K-major as
(⌈K/4⌉, N) so a tile of outputs is contiguous; padding uses code 1 (t = 0). Scales
α and offsets μ are per (group of `group_size` input columns, output row): (G, N).

With a per-token activation x ≈ s_m q_m (q integer), per group g:

    y_mn = s_m Σ_g [ α_gn Σ_{k∈g} q_mk c_kn + (μ_gn − α_gn) Σ_{k∈g} q_mk ],

an exact integer matmul of q with the codes plus a rank-1 offset term per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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

    def to(self, device: torch.device | str) -> PackedTernary:
        return PackedTernary(
            self.packed.to(device), self.alpha.to(device), self.mu.to(device), self.in_features, self.group_size
        )


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
    if alpha.shape != (N, -(-K // group_size)) or mu.shape != alpha.shape:
        raise ValueError(
            f"α, μ must have shape (N, ⌈K/group_size⌉) = {(N, -(-K // group_size))}, got {tuple(alpha.shape)}"
        )
    if group_size % 4:
        raise ValueError(f"group_size must be a multiple of 4, got {group_size}")
    return PackedTernary(pack_codes(codes), alpha.T.float().contiguous(), mu.T.float().contiguous(), K, group_size)


def dequantize(w: PackedTernary) -> Tensor:
    """Ŵ (N, K) in float32: α_gn t_kn + μ_gn for k in group g."""
    group = torch.arange(w.in_features, device=w.packed.device) // w.group_size
    t = unpack_codes(w.packed, w.in_features).float()
    return w.alpha.T[:, group] * t + w.mu.T[:, group]


def matmul_a16(x: Tensor, w: PackedTernary) -> Tensor:
    """Reference W1.58A16: y = x Ŵᵀ, computed in float32, returned in x's dtype."""
    return (x.float() @ dequantize(w).T).to(x.dtype)


def quantize_activations(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-token quantization x ≈ s q, q int8 in [−2^{b−1}+1, 2^{b−1}−1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer activation path supports 2..8 bits, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    s = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    q = torch.clamp(torch.round(x.float() / s), -qmax, qmax).to(torch.int8)
    return q, s.squeeze(-1)


def group_accumulators(q: Tensor, w: PackedTernary) -> tuple[Tensor, Tensor]:
    """Exact integer parts per group: A_gmn = Σ_{k∈g} q_mk c_kn (int32, c = t+1) and R_gm = Σ_{k∈g} q_mk."""
    c = (unpack_codes(w.packed, w.in_features).to(torch.int32) + 1).T  # (K, N)
    qi = q.to(torch.int32)
    G = w.alpha.shape[0]
    A = torch.stack(
        [
            qi[:, g * w.group_size : (g + 1) * w.group_size] @ c[g * w.group_size : (g + 1) * w.group_size]
            for g in range(G)
        ]
    )
    R = torch.stack([qi[:, g * w.group_size : (g + 1) * w.group_size].sum(1) for g in range(G)])
    return A, R


def matmul_int(q: Tensor, s: Tensor, w: PackedTernary) -> Tensor:
    """Reference integer-activation path: y_mn = s_m Σ_g [α_gn A_gmn + (μ_gn − α_gn) R_gm] (float32)."""
    A, R = group_accumulators(q, w)
    return s[:, None] * (w.alpha[:, None, :] * A.float() + (w.mu - w.alpha)[:, None, :] * R.float()[..., None]).sum(0)
