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


def _levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """The range of the integer codes: −q..q symmetric, 0..2^b − 1 asymmetric."""
    q = 2 ** (bits - 1) - 1
    return (-q, q) if symmetric else (0, 2**bits - 1)


def _extremes(x: Tensor, symmetric: bool) -> list[Tensor]:
    """The extremes per slice that the grid spans: max |x|, or max x and min x."""
    if symmetric:
        return [x.abs().amax(dim=-1, keepdim=True)]
    return [x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)]


def _extreme_indices(x: Tensor, symmetric: bool) -> list[Tensor]:
    """Where the :func:`_extremes` are (of a tie, the entry ``torch.max`` / ``torch.min`` pick)."""
    if symmetric:
        return [x.abs().max(dim=-1, keepdim=True).indices]
    return [x.max(dim=-1, keepdim=True).indices, x.min(dim=-1, keepdim=True).indices]


def _grid(extremes: list[Tensor], bits: int, clip: float | Tensor, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Scale s, zero point z and the mask of slices with a positive span (the others get s = 1)."""
    high = _levels(bits, symmetric)[1]
    if symmetric:
        raw = clip * extremes[0] / high
    else:
        raw = (clip * extremes[0] - clip * extremes[1]) / high
    valid = raw > 0
    scale = torch.where(valid, raw, torch.ones_like(raw))
    zero = torch.zeros_like(scale) if symmetric else torch.round(-(clip * extremes[1]) / scale)
    return scale, zero, valid


def uniform_grid(x: Tensor, bits: int, *, clip: float = 1.0, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Scale s and zero point z (integer-valued, 0 when symmetric) per slice of the last dimension."""
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs at least 2 bits")
    scale, zero, _ = _grid(_extremes(x, symmetric), bits, clip, symmetric)
    return scale, zero


def _unclamped_codes(x: Tensor, scale: Tensor, zero: Tensor, symmetric: bool) -> Tensor:
    return torch.round(x / scale) if symmetric else torch.round(x / scale) + zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, *, bits: int, symmetric: bool) -> Tensor:
    """Integer codes of x on the grid (s, z)."""
    return torch.clamp(_unclamped_codes(x, scale, zero, symmetric), *_levels(bits, symmetric))


class _FakeQuantize(torch.autograd.Function):
    """x̂ of :func:`fake_quantize` (float32 x) with the straight-through gradient of the module
    docstring written out: with c the clamped codes, u the unclamped ones, 1_in = [u = c] and g
    the incoming gradient, per slice

        ∂/∂x (direct) = g·1_in,  ∂/∂s = Σ g(c − z) − Σ g·1_in·x / s,  ∂/∂z = s(Σ g·1_in − Σ g),

    then on through z = round(−p·min x / s), s = p·span / (2^b − 1) (or p·max|x| / q) to p and to
    the extreme entries of x: a few passes over x for the gradient, instead of replaying the two
    dozen elementwise operations autograd would record; where several entries tie for an
    extreme, one of them takes its gradient (a subgradient, as any choice is)."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: float | Tensor, bits: int, symmetric: bool) -> Tensor:
        values = _extremes(x, symmetric)
        scale, zero, valid = _grid(values, bits, clip, symmetric)
        unclamped = _unclamped_codes(x, scale, zero, symmetric)
        codes = torch.clamp(unclamped, *_levels(bits, symmetric))
        centered = codes - zero
        clip_t = clip if isinstance(clip, Tensor) else torch.tensor(float(clip))
        ctx.save_for_backward(x, clip_t, scale, zero, valid, centered, codes == unclamped, *values)
        ctx.bits, ctx.symmetric = bits, symmetric
        return scale * centered

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, clip, scale, zero, valid, centered, inside, *values = ctx.saved_tensors
        indices = _extreme_indices(x, ctx.symmetric)  # only the backward pass needs them
        high = _levels(ctx.bits, ctx.symmetric)[1]
        direct = torch.where(inside, grad, 0.0)
        grad_scale = (grad * centered).sum(-1, keepdim=True) - (direct * x).sum(-1, keepdim=True) / scale
        if ctx.symmetric:
            (top,), (at,) = values, indices
            grad_top = grad_scale * valid / high  # ∂/∂(p·max|x|)
            grads = [grad_top * x.gather(-1, at).sign()]
            grad_clip = (grad_top * top).sum()
        else:
            hi, lo = values
            grad_zero = scale * (direct.sum(-1, keepdim=True) - grad.sum(-1, keepdim=True))
            grad_span = (grad_scale + grad_zero * (clip * lo) / scale**2) * valid / high
            grads = [grad_span, -grad_zero / scale - grad_span]  # ∂/∂(p·max x), ∂/∂(p·min x)
            grad_clip = (grads[0] * hi + grads[1] * lo).sum()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = direct
            for at, g in zip(indices, grads, strict=True):
                grad_x.scatter_add_(-1, at, g * clip)
        return grad_x, grad_clip.reshape(clip.shape) if ctx.needs_input_grad[1] else None, None, None


def fake_quantize(x: Tensor, bits: int, *, clip: float | Tensor = 1.0, symmetric: bool = False) -> Tensor:
    """x̂: x quantized per slice of the last dimension (e.g. per token) and dequantized."""
    if bits >= 16:
        return x
    if bits not in ACTIVATION_BITS:
        raise ValueError(f"unsupported bit-width {bits}; choose from {ACTIVATION_BITS}")
    if not 0 < clip <= 1:
        raise ValueError(f"clipping ratio must be in (0, 1], got {clip}")
    xf = x.float()
    tracked = xf.requires_grad or (isinstance(clip, Tensor) and clip.requires_grad)
    if tracked and torch.is_grad_enabled():
        return _FakeQuantize.apply(xf, clip, bits, symmetric).to(x.dtype)
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
