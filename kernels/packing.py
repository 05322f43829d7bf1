"""The packed ternary weight layout: the one definition of how a ternary linear is stored
for the kernels.

Codes c = t + 1 ∈ {0, 1, 2}, 2 bits each, four per byte, laid out K-major as (⌈K/4⌉, N) so
a tile of outputs is contiguous. Within each group g of ``group_size`` input columns (the
last one may be shorter, S_g columns), the group's q_g = ⌈S_g/4⌉ packed rows hold four
contiguous runs of columns, one per bit plane: bits 2j..2j+1 of local row l hold column

    k = g·group_size + j·q_g + l,        j ∈ {0, 1, 2, 3}, l < q_g,

so a kernel that unpacks plane j of rows [l₀, l₀ + B) meets the activation columns
[k₀, k₀ + B), contiguous, which it reads with vector loads. Padding uses code 1 (t = 0).
Scales α and offsets μ are per (group, output row): (G, N), and Ŵ_nk = α_gn t_kn + μ_gn for
k in group g. (Format 3 packed k = 4r + j into row r, so each plane met the activations at
stride 4; :func:`unpack_codes_strided` reads it for conversion.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twla.kernels.trits import pack_trits

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

    def stored(self) -> Tensor:
        """The codes as a packed checkpoint stores them: base 3, uint8 (N, ⌈K/5⌉) (:mod:`twla.kernels.trits`)."""
        return pack_trits(unpack_codes(self.packed, self.in_features, self.group_size))

    def to(self, device: torch.device | str) -> PackedTernary:
        return PackedTernary(
            self.packed.to(device), self.alpha.to(device), self.mu.to(device), self.in_features, self.group_size
        )


def check_group_size(group_size: int) -> None:
    if group_size < 4 or group_size % 4:
        raise ValueError(f"group_size must be a positive multiple of 4, got {group_size}")


def _group_runs(K: int, group_size: int) -> list[tuple[int, int, int]]:
    """(first column, groups, columns per group) of the full groups taken together, then of the
    short last group, if any; a run's packed rows start at its first column / 4."""
    check_group_size(group_size)
    full = K // group_size
    runs = [(0, full, group_size)] if full else []
    return runs + ([(full * group_size, 1, K - full * group_size)] if K % group_size else [])


def pack_codes(T: Tensor, group_size: int) -> Tensor:
    """Ternary codes T (N, K) in {−1, 0, 1} → uint8 (⌈K/4⌉, N) in the grouped plane layout
    (module docstring)."""
    N, K = T.shape
    c = (T.to(torch.int16) + 1).to(torch.uint8)
    rows = []
    for start, groups, width in _group_runs(K, group_size):
        quarter = -(-width // 4)
        block = torch.ones(N, groups, 4 * quarter, dtype=torch.uint8, device=T.device)
        block[:, :, :width] = c[:, start : start + groups * width].reshape(N, groups, width)
        p = block.view(N, groups, 4, quarter)
        rows.append((p[:, :, 0] | (p[:, :, 1] << 2) | (p[:, :, 2] << 4) | (p[:, :, 3] << 6)).reshape(N, -1))
    return torch.cat(rows, 1).T.contiguous()


def unpack_codes(packed: Tensor, in_features: int, group_size: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int8 ternary codes (N, K)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1)
    N, cols = packed.shape[1], []
    for start, groups, width in _group_runs(in_features, group_size):
        quarter = -(-width // 4)
        rows = packed[start // 4 : start // 4 + groups * quarter].T.reshape(N, groups, 1, quarter)
        cols.append(((rows >> shifts) & 3).reshape(N, groups, 4 * quarter)[:, :, :width].reshape(N, -1))
    return (torch.cat(cols, 1).to(torch.int8) - 1).contiguous()


def unpack_codes_strided(packed: Tensor, in_features: int) -> Tensor:
    """Codes (N, K) from format 3's layout, k = 4r + j in bits 2j..2j+1 of row r (for conversion)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    c = (packed.T[..., None] >> shifts) & 3  # (N, Kp, 4)
    return (c.reshape(packed.shape[1], -1)[:, :in_features].to(torch.int8) - 1).contiguous()


def pack_ternary(codes: Tensor, alpha: Tensor, mu: Tensor, *, group_size: int) -> PackedTernary:
    """Pack codes (N, K) with per-(row, group) α, μ of shape (N, G) into the kernel layout."""
    N, K = codes.shape
    check_group_size(group_size)
    if alpha.shape != (N, -(-K // group_size)) or mu.shape != alpha.shape:
        raise ValueError(
            f"α, μ must have shape (N, ⌈K/group_size⌉) = {(N, -(-K // group_size))}, got {tuple(alpha.shape)}"
        )
    return PackedTernary(
        pack_codes(codes, group_size), alpha.T.float().contiguous(), mu.T.float().contiguous(), K, group_size
    )


def dequantize(w: PackedTernary) -> Tensor:
    """Ŵ (N, K) in float32: α_gn t_kn + μ_gn for k in group g."""
    group = torch.arange(w.in_features, device=w.packed.device) // w.group_size
    t = unpack_codes(w.packed, w.in_features, w.group_size).float()
    return w.alpha.T[:, group] * t + w.mu.T[:, group]


def random_packed(N: int, K: int, *, group_size: int = 128, device: str = "cpu", seed: int = 0) -> PackedTernary:
    """Random ternary codes with α ∈ [0.1, 1.1) and μ ~ 0.1·N(0, 1) per (row, group), packed."""
    g = torch.Generator(device=device).manual_seed(seed)
    T = (torch.randint(0, 3, (N, K), generator=g, device=device) - 1).to(torch.int8)
    G = -(-K // group_size)
    alpha = (torch.rand(N, G, generator=g, device=device) + 0.1).half().float()
    mu = (torch.randn(N, G, generator=g, device=device) * 0.1).half().float()
    return pack_ternary(T, alpha, mu, group_size=group_size)
