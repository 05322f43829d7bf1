"""Ternary codes stored in base 3: the packed checkpoint's layout of a ternary weight.

Five codes c = t + 1 ∈ {0, 1, 2} share a byte, b = Σ_{i<5} c_i·3^i ≤ 242 (3⁵ = 243 ≤ 256):
1.6 bits a code, against 2 in the kernels' bit planes (:mod:`twla.kernels.packing`) and the
log2 3 ≈ 1.585 of the entropy bound. A weight (N, K) is stored row by row along its input,
(N, ⌈K/5⌉) bytes, the last byte of a row padded with code 1 (t = 0). Kernels do not read it:
loading unpacks it once into their layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

TRITS_PER_BYTE = 5
PAD_TRITS = 121  # five codes 1, i.e. t = 0: 1 + 3 + 9 + 27 + 81
LARGEST = 3**TRITS_PER_BYTE - 1  # 242, the byte of five codes 2
_POWERS = [3**i for i in range(TRITS_PER_BYTE)]


def trit_bytes(in_features: int) -> int:
    """Bytes of one row of ``in_features`` codes."""
    return -(-in_features // TRITS_PER_BYTE)


def pack_trits(T: Tensor) -> Tensor:
    """Ternary codes T (N, K) in {−1, 0, 1} → uint8 (N, ⌈K/5⌉), five codes a byte in base 3."""
    N, K = T.shape
    c = torch.nn.functional.pad(T.to(torch.int16) + 1, (0, -K % TRITS_PER_BYTE), value=1)
    powers = torch.tensor(_POWERS, dtype=torch.int16, device=T.device)
    return (c.view(N, -1, TRITS_PER_BYTE) * powers).sum(-1).to(torch.uint8)


def unpack_trits(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of :func:`pack_trits`: int8 ternary codes (N, ``in_features``). A byte above 242
    holds no five codes: refused (a corrupt tensor)."""
    if packed.dtype != torch.uint8 or packed.ndim != 2 or packed.shape[1] != trit_bytes(in_features):
        raise ValueError(
            f"base-3 codes of {in_features} inputs are uint8 (N, {trit_bytes(in_features)}), got "
            f"{packed.dtype} {tuple(packed.shape)}"
        )
    if packed.numel() and int(packed.max()) > LARGEST:
        raise ValueError(f"base-3 codes hold bytes up to {LARGEST}, found {int(packed.max())}: the tensor is corrupt")
    values = torch.arange(LARGEST + 1, device=packed.device)
    digits = torch.stack([values // p % 3 for p in _POWERS], -1).to(torch.int8) - 1  # (243, 5) codes t
    return digits[packed.long()].view(packed.shape[0], -1)[:, :in_features].contiguous()
