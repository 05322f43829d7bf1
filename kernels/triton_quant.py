"""Fused per-token activation quantization (Triton): x → (q int8, s, z, per-group row sums).

One program per token m, two passes over its K inputs (optionally gathered through a
column permutation, so reordered weight blocks see contiguous groups):

1. the grid, asymmetric  s = (p·max x − p·min x)/(2^b − 1), z = round(−p·min x / s),
   or symmetric  s = p·max|x| / (2^{b−1} − 1), z = 0;
2. q = clamp(round(x/s) + z) shifted by 2^{b−1} into int8, stored with R_gm = Σ_{k∈g} q_mk.

Divisions are IEEE round-to-nearest, rounding is half-to-even and multiply-adds are not
fused into FMAs, so q equals :func:`twla.kernels.reference.quantize_activations` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from twla.kernels.reference import QuantizedActivations

CHUNK = 128  # inputs per step (64 for group sizes that are multiples of 64 only)
MIN_CHUNK = 64


@triton.jit
def _round_half_even(v):
    f = tl.floor(v + 0.5)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(((f - v) == 0.5) & odd, f - 1.0, f)


@triton.jit
def _load_row(row_ptr, perm_ptr, rk, mask, HAS_PERM: tl.constexpr):
    """x[rk] of one token, or x[perm[rk]], in float32."""
    if HAS_PERM:
        src = tl.load(perm_ptr + rk, mask=mask, other=0)
    else:
        src = rk
    return tl.load(row_ptr + src, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quantize_kernel(
    x_ptr, perm_ptr, q_ptr, s_ptr, z_ptr, r_ptr,
    K, G, stride_xm, stride_qm, stride_rm, clip,
    SYMMETRIC: tl.constexpr, LEVELS: tl.constexpr, QLO: tl.constexpr, QHI: tl.constexpr, SHIFT: tl.constexpr,
    HAS_PERM: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    rc = tl.arange(0, CHUNK)
    hi = tl.full((), float("-inf"), tl.float32)
    lo = tl.full((), float("inf"), tl.float32)
    for k0 in range(0, K, CHUNK):
        rk = k0 + rc
        mask = rk < K
        x = _load_row(x_ptr + m * stride_xm, perm_ptr, rk, mask, HAS_PERM)
        if SYMMETRIC:
            hi = tl.maximum(hi, tl.max(tl.abs(x), 0))
        else:
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), 0))
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), 0))
    if SYMMETRIC:  # LEVELS = 2^{b−1} − 1
        scale = tl.math.div_rn(clip * hi, LEVELS * 1.0)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = 0.0
    else:  # LEVELS = 2^b − 1
        lo = clip * lo
        scale = tl.math.div_rn(clip * hi - lo, LEVELS * 1.0)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = _round_half_even(tl.math.div_rn(-lo, scale))
    for g in range(0, G):
        total = tl.zeros((), dtype=tl.int32)
        for i in range(0, GROUP, CHUNK):
            rk = g * GROUP + i + rc
            mask = rk < K
            x = _load_row(x_ptr + m * stride_xm, perm_ptr, rk, mask, HAS_PERM)
            code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)) + zero, QLO), QHI)
            q = (code - SHIFT).to(tl.int32)
            tl.store(q_ptr + m * stride_qm + rk, q.to(tl.int8), mask=mask)
            total += tl.sum(tl.where(mask, q, 0), 0)
        tl.store(r_ptr + m * stride_rm + g, total)
    tl.store(s_ptr + m, scale)
    tl.store(z_ptr + m, zero - SHIFT)


def quantize_activations_triton(
    x: Tensor,
    bits: int,
    *,
    clip: float = 1.0,
    symmetric: bool = False,
    group_size: int = 128,
    perm: Tensor | None = None,
) -> QuantizedActivations:
    """The Triton twin of :func:`twla.kernels.reference.quantize_activations` for x (M, K)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"the integer activation path supports 2..8 bits, got {bits}")
    if group_size % MIN_CHUNK:
        raise ValueError(f"the Triton quantization kernel needs group_size a multiple of {MIN_CHUNK}, got {group_size}")
    chunk = CHUNK if group_size % CHUNK == 0 else MIN_CHUNK
    if not 0 < clip <= 1:
        raise ValueError(f"clipping ratio must be in (0, 1], got {clip}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    G = -(-K // group_size)
    levels = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    shift = 0 if symmetric else 2 ** (bits - 1)
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    zero = torch.empty(M, dtype=torch.float32, device=x.device)
    rowsum = torch.empty(M, G, dtype=torch.int32, device=x.device)
    _quantize_kernel[(M,)](
        x, perm if perm is not None else q, q, scale, zero, rowsum,
        K, G, x.stride(0), q.stride(0), rowsum.stride(0), float(clip),
        SYMMETRIC=symmetric, LEVELS=levels, QLO=-levels if symmetric else 0, QHI=levels, SHIFT=shift,
        HAS_PERM=perm is not None, GROUP=group_size, CHUNK=chunk, enable_fp_fusion=False,
    )  # fmt: skip
    return QuantizedActivations(q, scale, zero, rowsum, symmetric)
