"""The packed ternary weight layout: the one definition of how a ternary linear is stored
for the kernels.

Codes c = t + 1 ∈ {0, 1, 2}, 2 bits each, four per byte along the input dimension K
(k = 4r + j sits in bits 2j..2j+1 of byte r), laid out K-major as (⌈K/4⌉, N) so a tile
of outputs is contiguous; padding uses code 1 (t = 0). Scales α and offsets μ are per
(group of ``group_size`` input columns, output row): (G, N), and
Ŵ_nk = α_gn t_kn + μ_gn for k in group g.
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

    @property
    def groups(self) -> int:
        return self.alpha.shape[0]

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


def random_packed(N: int, K: int, group_size: int = 128, device: str = "cpu", seed: int = 0) -> PackedTernary:
    """Random ternary codes with α ∈ [0.1, 1.1) and μ ~ 0.1·N(0, 1) per (row, group), packed."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = (torch.randint(0, 3, (N, K), generator=g, device=device) - 1).to(torch.int8)
    G = -(-K // group_size)
    alpha = (torch.rand(N, G, generator=g, device=device) + 0.1).half().float()
    mu = (torch.randn(N, G, generator=g, device=device) * 0.1).half().float()
    return pack_ternary(T, alpha, mu, group_size)
