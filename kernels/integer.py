"""The packed layout of a b-bit integer weight (b = 2..8): the formats a mixed-precision model
gives some of its linears besides ternary.

    Ŵ_nk = s_gn (c_nk − z_gn),   c ∈ [0, 2^b − 1],  z ∈ [0, 2^b − 1]  (k in group g),

with a float16 scale s and an integer zero point z per (group, output row). Integers are stored
in b bit planes, eight values per byte along the last dimension: the codes (N, K) as uint8
(b, N, ⌈K/8⌉), the zero points (G, N) as (b, G, ⌈N/8⌉), so a weight costs exactly b bits and
a zero point b bits when K and N are multiples of 8. A stock loader meets a three-dimensional
``weight`` and refuses it. The CPU kernel serves b ≤ 4 (:func:`twla.kernels.cpu.integer_to_int4`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INTEGER_BITS = tuple(range(2, 9))  # the bit-widths this layout holds


def check_integer_bits(bits: int) -> None:
    if bits not in INTEGER_BITS:
        raise ValueError(f"packed integer weights have 2 to 8 bits, got {bits}")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Integers (R, C) in [0, 2^bits − 1] → uint8 (bits, R, ⌈C/8⌉): bit p of column 8j + i is bit i
    of byte j in plane p (padding columns are 0)."""
    check_integer_bits(bits)
    R, C = values.shape
    v = torch.zeros(R, -(-C // 8) * 8, dtype=torch.int32, device=values.device)
    v[:, :C] = values.to(torch.int32)
    if (v < 0).any() or (v >= 2**bits).any():
        raise ValueError(f"values outside [0, {2**bits - 1}] do not fit {bits} bits")
    weights = (1 << torch.arange(8, device=values.device, dtype=torch.int32)).view(1, 1, 8)
    planes = [(((v >> p) & 1).view(R, -1, 8) * weights).sum(-1) for p in range(bits)]
    return torch.stack(planes).to(torch.uint8)


def unpack_bits(planes: Tensor, columns: int) -> Tensor:
    """Inverse of :func:`pack_bits`: int32 (R, ``columns``)."""
    shifts = torch.arange(8, device=planes.device, dtype=torch.int32)
    bits = (planes.to(torch.int32)[..., None] >> shifts) & 1  # (b, R, C/8, 8)
    values = (bits << torch.arange(planes.shape[0], device=planes.device).view(-1, 1, 1, 1)).sum(0)
    return values.reshape(planes.shape[1], -1)[:, :columns].to(torch.int32)


@dataclass
class PackedInteger:
    """A b-bit integer weight (N outputs, K inputs) in its packed layout (module docstring)."""

    codes: Tensor  # uint8 (bits, N, ⌈K/8⌉)
    scale: Tensor  # float32 (G, N), float16 values
    zero: Tensor  # uint8 (bits, G, ⌈N/8⌉)
    in_features: int
    group_size: int

    @property
    def bits(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    @property
    def groups(self) -> int:
        return self.scale.shape[0]

    def integer_codes(self) -> Tensor:
        """c (N, K), int32."""
        return unpack_bits(self.codes, self.in_features)

    def zero_points(self) -> Tensor:
        """z (G, N), int32."""
        return unpack_bits(self.zero, self.out_features)


def pack_integer(codes: Tensor, scale: Tensor, zero: Tensor, *, bits: int, group_size: int) -> PackedInteger:
    """Pack codes (N, K) with per-(row, group) scales and zero points of shape (N, G)."""
    N, K = codes.shape
    G = -(-K // group_size)
    if scale.shape != (N, G) or zero.shape != scale.shape:
        raise ValueError(f"scale and zero must have shape (N, ⌈K/group_size⌉) = {(N, G)}, got {tuple(scale.shape)}")
    if not torch.equal(zero, zero.round()):
        raise ValueError("zero points must be integers")
    return PackedInteger(pack_bits(codes, bits), scale.T.float().contiguous(), pack_bits(zero.T, bits), K, group_size)


def dequantize_integer(w: PackedInteger) -> Tensor:
    """Ŵ (N, K) in float32: s_gn (c_nk − z_gn) for k in group g."""
    group = torch.arange(w.in_features, device=w.codes.device) // w.group_size
    c = w.integer_codes().float()
    return w.scale.T[:, group] * (c - w.zero_points().T.float()[:, group])
