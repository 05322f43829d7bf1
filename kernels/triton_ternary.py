"""Triton ternary GEMM / split-K GEMV on the packed layout of :mod:`twla.kernels.reference`.

One kernel, two activation types (compile-time switch):
- A16: x in fp16/bf16/fp32; per group g, acc = x_g · t_g (t = c − 1 in x's dtype) with
  fp32 accumulation, y += α_g acc + μ_g rowsum(x_g).
- int8-held activations (≤ 8 bits): acc = q_g · c_g exactly as int8 × int8 → int32 `tl.dot`,
  y += α_g acc + (μ_g − α_g) rowsum(q_g), and finally y ·= s (per-token scale).

Codes are unpacked in registers: plane j of a packed tile holds k = 4r + j, so each
plane meets the activation columns of stride 4. Each program owns an (M, N) tile and a
range of groups (split-K); partial results go to a (split, M, N) fp32 buffer summed in a
fixed order, so the result is deterministic. Small M (decode) uses the split to fill
the GPU. Set TRITON_INTERPRET=1 before import to run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from twla.kernels.reference import PAD_BYTE, PackedTernary

BLOCK_P = 32  # packed rows per step: 128 input columns


@triton.jit
def _ternary_kernel(
    x_ptr, p_ptr, a_ptr, mu_ptr, s_ptr, y_ptr,
    M, N, K, Kp, G, groups_per_split,
    stride_xm, stride_ym, stride_ys,
    GROUP_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    INT_ACT: tl.constexpr, PAD: tl.constexpr,
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
            rsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in range(0, GROUP_P, BLOCK_P):
            r = g * GROUP_P + i + rp
            w = tl.load(p_ptr + r[:, None] * N + rn[None, :], mask=(r < Kp)[:, None] & mask_n[None, :], other=PAD)
            for j in tl.static_range(4):
                k = 4 * r + j
                x = tl.load(
                    x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k < K)[None, :], other=0
                )
                c = ((w >> (2 * j)) & 3).to(tl.int8)
                if INT_ACT:
                    acc += tl.dot(x, c, out_dtype=tl.int32)
                    rsum += tl.sum(x.to(tl.int32), axis=1)
                else:
                    acc += tl.dot(x, (c - 1).to(x.dtype), input_precision="ieee")
                    rsum += tl.sum(x.to(tl.float32), axis=1)
        alpha = tl.load(a_ptr + g * N + rn, mask=mask_n, other=0.0)
        mu = tl.load(mu_ptr + g * N + rn, mask=mask_n, other=0.0)
        if INT_ACT:
            out += alpha[None, :] * acc.to(tl.float32) + (mu - alpha)[None, :] * rsum.to(tl.float32)[:, None]
        else:
            out += alpha[None, :] * acc + mu[None, :] * rsum[:, None]
    if INT_ACT:
        s = tl.load(s_ptr + rm, mask=mask_m, other=0.0)
        out = out * s[:, None]
    y = y_ptr + pid_k * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, out, mask=mask_m[:, None] & mask_n[None, :])


def _split_for(M: int, n_tiles: int, G: int, device: torch.device) -> int:
    """Split K over groups when the (M, N) tiles alone cannot fill the GPU (decode)."""
    if M > 64 or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(G, (2 * sms) // max(n_tiles, 1)))


def ternary_matmul(
    x: Tensor,
    w: PackedTernary,
    scale: Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    split: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Tensor:
    """y = x Ŵᵀ for x (M, K): fp activations (A16), or int8-held activations with per-token
    ``scale`` (x ≈ scale · q). Returns float32 for int8 input, else x's dtype. Tile sizes,
    split count, warps and pipeline stages are explicit (no autotuning); the defaults are
    the best of a small sweep on an H100 (decode: 16 × 256 tiles)."""
    if w.group_size % (4 * BLOCK_P):
        raise ValueError(f"the Triton kernel needs group_size a multiple of {4 * BLOCK_P}, got {w.group_size}")
    M, K = x.shape
    if K != w.in_features:
        raise ValueError(f"activation has {K} features, weight expects {w.in_features}")
    int_act = x.dtype == torch.int8
    if int_act and (scale is None or scale.shape != (M,)):
        raise ValueError("int8 activations need a per-token scale of shape (M,)")
    x = x.contiguous()
    N, G = w.out_features, w.alpha.shape[0]
    block_m = block_m or (16 if M <= 16 else 128)
    block_n = block_n or (256 if M <= 16 else 128)
    grid_mn = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    split = split or _split_for(M, grid_mn[0] * grid_mn[1], G, x.device)
    per_split = triton.cdiv(G, split)
    split = triton.cdiv(G, per_split)
    y = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    s = scale.float().contiguous() if int_act else w.alpha  # unused without int activations
    _ternary_kernel[(*grid_mn, split)](
        x, w.packed, w.alpha, w.mu, s, y,
        M, N, K, w.packed.shape[0], G, per_split,
        x.stride(0), y.stride(1), y.stride(0),
        GROUP_P=w.group_size // 4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=BLOCK_P,
        INT_ACT=int_act, PAD=PAD_BYTE, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    y = y.sum(0) if split > 1 else y[0]
    return y if int_act else y.to(x.dtype)
