"""Which kernels run a ternary linear: Triton on CUDA, the torch reference elsewhere.

The choice is ``auto`` (the default: Triton for CUDA tensors, torch otherwise), ``triton``
or ``torch``; set it with :func:`set_kernel_backend`, temporarily with :func:`kernel_backend`,
or with the environment variable ``TWLA_KERNELS``. Forcing ``triton`` for CPU tensors needs
``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.nn import functional as F

from twla.kernels.packing import PackedTernary, dequantize
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant

BACKENDS = ("auto", "triton", "torch")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name


_backend = _check(os.environ.get("TWLA_KERNELS", "auto"))


def set_kernel_backend(name: str) -> None:
    """Select ``auto``, ``triton`` or ``torch`` for every ternary linear."""
    global _backend
    _backend = _check(name)


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """``with kernel_backend("torch"): ...`` runs the block on the chosen backend."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    """The chosen backend: ``auto``, ``triton`` or ``torch``."""
    return _backend


def resolve(device: torch.device) -> str:
    """The backend that runs on ``device`` now: ``triton`` or ``torch``."""
    if _backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if _backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the triton kernel backend needs CUDA tensors, or TRITON_INTERPRET=1 set before import to run on CPU"
        )
    return _backend


def ternary_linear(
    x: Tensor,
    w: PackedTernary,
    *,
    act: ActivationQuant = UNQUANTIZED,
    perm: Tensor | None = None,
    inverse_perm: Tensor | None = None,
    wsum: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """y = Q_a(x) Ŵᵀ + b for x (M, K) in the layer's (rotated) input basis, in x's dtype.

    The weight's groups are columns ``perm`` of the input (``inverse_perm`` undoes it).
    ``act`` quantizes x per token (or not, at 16 bits); asymmetric activations
    on the Triton path need ``wsum`` = Σ_k Ŵ_k (:func:`~twla.kernels.reference.weight_sums`).

    torch: Ŵ is unpacked to the input order and x̂ fake-quantized (the same values as the
    integer path's s(q − z)), so the result is that of the fake-quantized layer. Triton: the
    fused quantization kernel gathers and quantizes x, then the int8 GEMM (or GEMV) runs on
    the packed codes; 16 bits runs the A16 kernel.
    """
    if resolve(x.device) == "torch":
        W = dequantize(w)
        if inverse_perm is not None:
            W = W[:, inverse_perm]
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(act(x), W.to(x.dtype), b)
    from twla.kernels.triton_quant import quantize_activations_triton
    from twla.kernels.triton_ternary import ternary_matmul

    if not act.quantized:
        y = ternary_matmul(x if perm is None else x[:, perm], w)
    else:
        q = quantize_activations_triton(
            x, act.bits, clip=float(act.clip), symmetric=act.symmetric, group_size=w.group_size, perm=perm
        )
        y = ternary_matmul(q, w, wsum=wsum)
    return (y if bias is None else y + bias).to(x.dtype)
