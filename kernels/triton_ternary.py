"""Triton ternary GEMM and decode GEMV on the packed layout of :mod:`twla.kernels.packing`.

Both kernels take two activation types (a compile-time switch):

- A16: x in fp16/bf16/fp32; per group g, acc = x_g · t_g (t = c − 1 unpacked to x's dtype)
  with fp32 accumulation; y += α_g acc + μ_g Σ_{k∈g} x_k.
- int8-held activations (≤ 8 bits, :class:`QuantizedActivations`): acc = q_g · c_g exactly in
  int32; y += α_g acc + (μ_g − α_g) R_g with the row sums R from the quantization kernel;
  the epilogue is y ← s (y − z Σ_k Ŵ_k).

Codes are unpacked in registers: plane j of local packed rows [i, i + BLOCK_P) of group g
holds the contiguous columns g·group_size + j·q_g + [i, i + BLOCK_P) (q_g: the group's packed
rows, ``LAST_Q`` for a short last group), so each plane's activation tile is one contiguous
run per token, read with vector loads. The GEMM owns an (M, N) tile and runs `tl.dot`
per plane (int8 × int8 → int32, or fp16/bf16 → fp32). The GEMV (decode, M ≤
``GEMV_MAX_M``) owns N outputs of one token and reduces in registers, without tensor
cores. Both split the K groups over programs when the tiles alone cannot fill the GPU;
split partials go to a (split, M, N) fp32 buffer summed in a fixed order, so results are
deterministic. Set TRITON_INTERPRET=1 before import to run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from twla.kernels.packing import PAD_BYTE, PackedTernary
from twla.kernels.reference import QuantizedActivations

BLOCK_P = 32  # packed rows per step: 128 input columns (16 rows, 64 columns, for groups of 64)
MIN_GROUP = 64  # tl.dot needs ≥ 16 packed rows per step
GEMV_MAX_M = 4  # tokens up to which the decode GEMV is used


@triton.jit
def _gemm_kernel(
    x_ptr, p_ptr, a_ptr, mu_ptr, r_ptr, s_ptr, z_ptr, wsum_ptr, y_ptr,
    M, N, K, G, groups_per_split,
    stride_xm, stride_rm, stride_ym, stride_ys,
    GROUP_P: tl.constexpr, LAST_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr, INT_ACT: tl.constexpr, HAS_ZERO: tl.constexpr, PAD: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rp = tl.arange(0, BLOCK_P)
    mask_m = rm < M
    mask_n = rn < N
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, G)
    for g in range(g_start, g_end):
        if INT_ACT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        q = tl.where(g == G - 1, LAST_Q, GROUP_P)
        for i in range(0, GROUP_P, BLOCK_P):
            row = i + rp
            w = tl.load(
                p_ptr + (g * GROUP_P + row)[:, None] * N + rn[None, :],
                mask=(row < q)[:, None] & mask_n[None, :],
                other=PAD,
            )
            for j in tl.static_range(4):
                k = g * (4 * GROUP_P) + j * q + row
                x = tl.load(
                    x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=mask_m[:, None] & ((row < q) & (k < K))[None, :],
                    other=0,
                )
                c = ((w >> (2 * j)) & 3).to(tl.int8)
                if INT_ACT:
                    acc += tl.dot(x, c, out_dtype=tl.int32)
                else:
                    acc += tl.dot(x, (c - 1).to(x.dtype), input_precision="ieee")
                    xsum += tl.sum(x.to(tl.float32), axis=1)
        alpha = tl.load(a_ptr + g * N + rn, mask=mask_n, other=0.0)
        mu = tl.load(mu_ptr + g * N + rn, mask=mask_n, other=0.0)
        if INT_ACT:
            rsum = tl.load(r_ptr + rm * stride_rm + g, mask=mask_m, other=0).to(tl.float32)
            out += alpha[None, :] * acc.to(tl.float32) + (mu - alpha)[None, :] * rsum[:, None]
        else:
            out += alpha[None, :] * acc + mu[None, :] * xsum[:, None]
    if INT_ACT:  # s_m (y_mn − z_m Σ_k Ŵ_nk); the zero-point term is added by the first split only
        if HAS_ZERO:
            z = tl.load(z_ptr + rm, mask=mask_m, other=0.0) * tl.where(pid_k == 0, 1.0, 0.0)
            out -= z[:, None] * tl.load(wsum_ptr + rn, mask=mask_n, other=0.0)[None, :]
        out *= tl.load(s_ptr + rm, mask=mask_m, other=0.0)[:, None]
    y = y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, out, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_kernel(
    x_ptr, p_ptr, a_ptr, mu_ptr, r_ptr, s_ptr, z_ptr, wsum_ptr, y_ptr,
    N, K, G, groups_per_split,
    stride_xm, stride_rm, stride_ym, stride_ys,
    GROUP_P: tl.constexpr, LAST_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    INT_ACT: tl.constexpr, HAS_ZERO: tl.constexpr, PAD: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rp = tl.arange(0, BLOCK_P)
    mask_n = rn < N
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, G)
    for g in range(g_start, g_end):
        if INT_ACT:
            acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            xsum = tl.zeros((), dtype=tl.float32)
        q = tl.where(g == G - 1, LAST_Q, GROUP_P)
        for i in range(0, GROUP_P, BLOCK_P):
            row = i + rp
            w = tl.load(
                p_ptr + (g * GROUP_P + row)[:, None] * N + rn[None, :],
                mask=(row < q)[:, None] & mask_n[None, :],
                other=PAD,
            )
            for j in tl.static_range(4):
                k = g * (4 * GROUP_P) + j * q + row
                x = tl.load(x_ptr + m * stride_xm + k, mask=(row < q) & (k < K), other=0)
                c = (w >> (2 * j)) & 3
                if INT_ACT:
                    acc += tl.sum(x.to(tl.int32)[:, None] * c.to(tl.int32), axis=0)
                else:
                    xf = x.to(tl.float32)
                    acc += tl.sum(xf[:, None] * (c.to(tl.float32) - 1.0), axis=0)
                    xsum += tl.sum(xf, axis=0)
        alpha = tl.load(a_ptr + g * N + rn, mask=mask_n, other=0.0)
        mu = tl.load(mu_ptr + g * N + rn, mask=mask_n, other=0.0)
        if INT_ACT:
            rsum = tl.load(r_ptr + m * stride_rm + g).to(tl.float32)
            out += alpha * acc.to(tl.float32) + (mu - alpha) * rsum
        else:
            out += alpha * acc + mu * xsum
    if INT_ACT:
        if HAS_ZERO:
            z = tl.load(z_ptr + m) * tl.where(pid_k == 0, 1.0, 0.0)
            out -= z * tl.load(wsum_ptr + rn, mask=mask_n, other=0.0)
        out *= tl.load(s_ptr + m)
    tl.store(y_ptr + pid_k * stride_ys + m * stride_ym + rn, out, mask=mask_n)


def _split_for(n_tiles: int, G: int, device: torch.device) -> int:
    """Split K over groups when the output tiles alone cannot fill the GPU (about two programs per SM)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(G, (2 * sms) // max(n_tiles, 1)))


def ternary_matmul(
    x: Tensor | QuantizedActivations,
    w: PackedTernary,
    *,
    wsum: Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    split: int | None = None,
    gemv: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Tensor:
    """y = x̂ Ŵᵀ for x (M, K): fp activations (A16, returns x's dtype) or
    :class:`QuantizedActivations` (returns float32; asymmetric ones need ``wsum`` = Σ_k Ŵ_k,
    see :func:`~twla.kernels.reference.weight_sums`).

    Small M runs the GEMV unless ``gemv=False``. Tile sizes, split count, warps and stages
    are explicit (no autotuning, so the interpreter runs it); they were not tuned on a GPU.
    """
    if w.group_size % MIN_GROUP:
        raise ValueError(f"the Triton kernels need group_size a multiple of {MIN_GROUP}, got {w.group_size}")
    block_p = BLOCK_P if w.group_size % (4 * BLOCK_P) == 0 else MIN_GROUP // 4
    int_act = isinstance(x, QuantizedActivations)
    xt = x.q if int_act else x
    if xt.dim() != 2:
        raise ValueError(f"activations must be 2-D (M, K), got shape {tuple(xt.shape)}")
    M, K = xt.shape
    if K != w.in_features:
        raise ValueError(f"activation has {K} features, weight expects {w.in_features}")
    if xt.stride(-1) != 1:
        xt = xt.contiguous()
    has_zero = int_act and not x.symmetric
    if has_zero and (wsum is None or wsum.shape != (w.out_features,)):
        raise ValueError("asymmetric activations need the weight sums wsum of shape (N,)")
    N, G = w.out_features, w.groups
    gemv = M <= GEMV_MAX_M if gemv is None else gemv
    if gemv:
        block_m, block_n = 1, block_n or 128
    else:
        block_m = block_m or (16 if M <= 16 else 64 if M <= 128 else 128)
        block_n = block_n or 128
    grid_mn = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    split = split or _split_for(grid_mn[0] * grid_mn[1], G, xt.device)
    per_split = triton.cdiv(G, split)
    split = triton.cdiv(G, per_split)
    y = torch.empty(split, M, N, dtype=torch.float32, device=xt.device)
    if int_act:
        r, s, z = x.rowsum, x.scale, x.zero
        stride_rm = r.stride(0)
    else:
        r = s = z = w.alpha  # unused without int activations
        stride_rm = 0
    wsum = wsum if has_zero else w.alpha
    last_q = -(-(K - (G - 1) * w.group_size) // 4)  # packed rows of the last group
    common = dict(
        GROUP_P=w.group_size // 4, LAST_Q=last_q, BLOCK_N=block_n, BLOCK_P=block_p, INT_ACT=int_act, HAS_ZERO=has_zero
    )
    args = (xt, w.packed, w.alpha, w.mu, r, s, z, wsum, y)
    strides = (xt.stride(0), stride_rm, y.stride(1), y.stride(0))
    if gemv:
        _gemv_kernel[(grid_mn[1], split, M)](
            *args, N, K, G, per_split, *strides,
            PAD=PAD_BYTE, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True, **common,
        )  # fmt: skip
    else:
        _gemm_kernel[(*grid_mn, split)](
            *args, M, N, K, G, per_split, *strides,
            BLOCK_M=block_m, PAD=PAD_BYTE, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True, **common,
        )  # fmt: skip
    y = y.sum(0) if split > 1 else y[0]
    return y if int_act else y.to(xt.dtype)
