"""The CPU kernel of the packed linears: torch's grouped 4-bit weight matmul.

torch ships a CPU matmul for weights of 4-bit codes q ∈ [0, 15] in groups of input columns,

    Ŵ_nk = (q_nk − 8)·s_gn + z_gn,

(``torch._weight_int4pack_mm_for_cpu``: bfloat16 activations and results, float32 sums; float16
and float32 activations take a fallback 80–100× slower, measured). A ternary
group is such a group exactly: q = t + 8, s = α, z = μ; so is a group of b ≤ 4-bit integer codes
s (c − z): q = c, z_kernel = s (8 − z). The codes are converted once into the kernel's own layout
(:func:`to_int4`, :func:`integer_to_int4`; half a byte per weight, the packed codes are not kept),
and every call multiplies without unpacking the weight.

Groups: the kernel's group is 64 columns when the weight's group is a multiple of 64 (a group
of 128 is two groups with the same α, μ), else 32; groups of other sizes are not
served (:func:`int4_group` is None). The output rows are padded to a multiple of 16 (rows of
zeros, cut off) and the inputs to a multiple of the group (zero activations, so the padded
columns add nothing).

Rounding: α, μ (s, z_kernel) and the results become bfloat16 (8 significant bits), and so do unquantized
activations. For quantized activations x̂ = s(q − z) the integers q − z (exact in bfloat16 up to
256) go in and the per-token scale s multiplies the result, so they add no rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from twla.kernels.integer import PackedInteger
from twla.kernels.packing import PackedTernary, unpack_codes
from twla.kernels.uniform import ActivationQuant

ROW_MULTIPLE = 16  # the kernel's output rows come in blocks of 16


def int4_available() -> bool:
    """Whether this torch has the CPU 4-bit weight kernel (torch ≥ 2.5)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def int4_group(group_size: int) -> int | None:
    """The kernel's group for a weight group of ``group_size`` columns (64 or 32), or None."""
    for size in (64, 32):
        if group_size % size == 0:
            return size
    return None


@dataclass
class Int4Weight:
    """A ternary or 4-bit integer weight (N outputs, K inputs) in the CPU kernel's layout."""

    packed: Tensor  # uint8, the kernel's layout of (N_pad, K_pad) 4-bit codes
    scales_zeros: Tensor  # bfloat16 (K_pad / group, N_pad, 2): α and μ per kernel group
    in_features: int
    out_features: int
    group: int

    @property
    def padded_in(self) -> int:
        return self.scales_zeros.shape[0] * self.group

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


def int4_layout(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Int4Weight:
    """The kernel layout of Ŵ_nk = (q_nk − 8)·s_gn + z_gn: codes q (N, K) in [0, 15], scales and
    offsets (G, N) per group of ``group_size`` columns (a multiple of the kernel's group)."""
    group = int4_group(group_size)
    if group is None:
        raise ValueError(f"the CPU 4-bit kernel needs groups of a multiple of 32 columns, not {group_size}")
    N, K = q.shape
    n_pad, k_pad = -(-N // ROW_MULTIPLE) * ROW_MULTIPLE, -(-K // group) * group
    padded = torch.full((n_pad, k_pad), 8, dtype=torch.int32)
    padded[:N, :K] = q.cpu().to(torch.int32)
    owner = torch.arange(0, k_pad, group) // group_size  # the weight's group of each kernel group
    scales_zeros = torch.zeros(k_pad // group, n_pad, 2)
    scales_zeros[:, :N, 0] = scales.cpu()[owner]
    scales_zeros[:, :N, 1] = zeros.cpu()[owner]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1)
    return Int4Weight(packed, scales_zeros.to(torch.bfloat16), K, N, group)


def to_int4(w: PackedTernary) -> Int4Weight:
    """The kernel layout of a packed ternary weight (q = t + 8, s = α, z = μ per kernel group)."""
    codes = unpack_codes(w.packed.cpu(), w.in_features, w.group_size).to(torch.int32) + 8
    return int4_layout(codes, w.alpha, w.mu, w.group_size)


def integer_to_int4(w: PackedInteger) -> Int4Weight:
    """The kernel layout of a packed integer weight of at most 4 bits: s (c − z) = (c − 8)·s + s (8 − z)."""
    if w.bits > 4:
        raise ValueError(f"the CPU 4-bit kernel takes codes of at most 4 bits, not {w.bits}")
    return int4_layout(w.integer_codes(), w.scale, w.scale * (8 - w.zero_points().float()), w.group_size)


def token_codes(x: Tensor, bits: int, clip: float | Tensor = 1.0, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Per-token quantization x̂ = s·(q − z) of x (M, K) in float32, as integers q − z and scales s
    (M, 1): the values of :func:`twla.kernels.uniform.fake_quantize`, in fewer operations (a call
    at M = 1 is bound by their count, not their size). ``clip`` may be a tensor of L ratios of
    shape (L, 1, 1): the codes of L linears reading the same x at once, (L, M, K) and (L, M, 1)."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = x.abs().amax(dim=-1, keepdim=True).mul(clip).div_(top)
        scale.masked_fill_(scale == 0, 1.0)
        return x.div(scale).round_().clamp_(-top, top), scale
    top = 2**bits - 1
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    if not isinstance(clip, float) or clip != 1.0:
        lo, hi = lo * clip, hi * clip
    scale = hi.sub_(lo).div_(top)
    scale.masked_fill_(scale == 0, 1.0)  # a constant token: the scale falls back to 1
    zero = lo.neg_().div_(scale).round_()
    return x.div(scale).round_().add_(zero).clamp_(0, top).sub_(zero), scale


def int4_mm(xb: Tensor, w: Int4Weight) -> Tensor:
    """x Ŵᵀ for bfloat16 x (M, K): bfloat16 (M, N)."""
    if w.padded_in > w.in_features:
        xb = F.pad(xb, (0, w.padded_in - w.in_features))
    return torch._weight_int4pack_mm_for_cpu(xb, w.packed, w.group, w.scales_zeros)[:, : w.out_features]


def matmul_int4(x: Tensor, w: Int4Weight, act: ActivationQuant) -> Tensor:
    """y = Q_a(x) Ŵᵀ in float32 for x (M, K), with Ŵ in the kernel layout (module docstring)."""
    if not act.quantized:
        return int4_mm(x.to(torch.bfloat16), w).float()
    q, scale = token_codes(x.float(), act.bits, float(act.clip), act.symmetric)
    return torch.mul(int4_mm(q.to(torch.bfloat16), w), scale)
