"""Uniform integer quantization: per-token activations and RTN weights.

Asymmetric min-max with clipping ratio p over the last dimension:
    s = p·(max x − min x)/(2^b − 1), z = round(−p·min x / s), x̂ = s·(clamp(round(x/s) + z, 0, 2^b − 1) − z).
Symmetric (the integer kernel's variant), levels −q..q with q = 2^{b−1} − 1:
    s = p·max|x| / q, x̂ = s·clamp(round(x/s), −q, q).

When autograd records through x or p, round is differentiated as the identity (the
straight-through estimator) and clamp as usual, so that p and whatever produced x can be
tuned through the quantizer; the values are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ACTIVATION_BITS = (2, 3, 4, 6, 8, 16)


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _round(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x) if x.requires_grad and torch.is_grad_enabled() else torch.round(x)


def uniform_grid(x: Tensor, bits: int, *, clip: float = 1.0, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale s and zero point z (integer-valued, 0 when symmetric) per slice of the last dimension."""
    if symmetric:
        if bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")
        scale = clip * x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    hi = clip * x.amax(dim=-1, keepdim=True)
    lo = clip * x.amin(dim=-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, _round(-lo / scale)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, *, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of x on the grid (s, z)."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return torch.clamp(_round(x / scale), -q, q)
    return torch.clamp(_round(x / scale) + zero, 0, 2**bits - 1)


def fake_quantize(x: Tensor, bits: int, *, clip: float = 1.0, symmetric: bool = False) -> Tensor:
    """x̂: x quantized per slice of the last dimension (e.g. per token) and dequantized."""
    if bits >= 16:
        return x
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose from {ACTIVATION_BITS}")
    if not 0 < clip <= 1:
        raise ValueError(f"clipping ratio must be in (0, 1], got {clip}")
    xf = x.float()
    scale, zero = uniform_grid(xf, bits, clip=clip, symmetric=symmetric)
    return (scale * (quantize_codes(xf, scale, zero, bits=bits, symmetric=symmetric) - zero)).to(x.dtype)


@dataclass(frozen=True)
class ActivationQuant:
    """How a linear layer quantizes its input per token: ``bits`` (16: not at all), clipping
    ratio ``clip`` = p ∈ (0, 1] (a float, or a scalar tensor while it is being tuned) and the
    ``symmetric`` or asymmetric grid of the module docstring. Calling it gives x̂."""

    bits: int = 16
    clip: float | Tensor = 1.0
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"unsupported activation bit-width {self.bits}; choose from {ACTIVATION_BITS}")
        if self.symmetric and self.bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def __call__(self, x: Tensor) -> Tensor:
        return fake_quantize(x, self.bits, clip=self.clip, symmetric=self.symmetric)

    def describe(self) -> str:
        """``act_bits=4, act_clip=0.90[, symmetric]`` for module reprs."""
        return f"act_bits={self.bits}, act_clip={float(self.clip):.2f}{', symmetric' if self.symmetric else ''}"


UNQUANTIZED = ActivationQuant()  # 16-bit inputs: x̂ = x
