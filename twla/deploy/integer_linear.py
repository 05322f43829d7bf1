"""The deployed integer linear: a b-bit weight (b = 2..8), the format a mixed-precision model gives
the linears that need more than ternary (``+wmix``), or every linear of a uniform method (``rtn4``).

    y = Q_a(x R)_π Ŵ_πᵀ + b,   Ŵ_π[n, k] = s_{g(k) n} (c_{k n} − z_{g(k) n}),  c, z ∈ [0, 2^b − 1],

(:class:`~twla.deploy.packed_linear.PackedLinear` describes R, π, Q_a; :mod:`twla.kernels.integer`
the layout). It computes what :class:`twla.quantization.fake_quant.QuantLinear` computes with the
weight on its integer grid. On the CPU, codes of at most 4 bits run in torch's 4-bit kernel
(:mod:`twla.deploy.cpu_layout`); elsewhere the weight is dequantized for each call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from twla.deploy.packed_linear import PackedLinear
from twla.kernels.integer import PackedInteger, check_integer_bits, dequantize_integer, pack_integer

if TYPE_CHECKING:
    from twla.quantization.fake_quant import QuantLinear
    from twla.quantization.weights import UniformWeight


class IntegerLinear(PackedLinear):
    """A linear layer on packed b-bit codes. Buffers ``weight`` (the codes' bit planes, uint8
    (b, N, ⌈K/8⌉)), ``scale`` (float16 values, (G, N)) and ``zero`` (the zero points' bit planes,
    uint8 (b, G, ⌈N/8⌉)) are what a packed checkpoint stores, with ``perm``, ``rot1``, ``rot2``
    when present."""

    kind = "integer"
    half_tensors = ("scale",)

    def __init__(self, *args, bits: int = 4, **kwargs) -> None:
        check_integer_bits(bits)
        self.bits = bits
        super().__init__(*args, **kwargs)

    def _register_weight(self, groups: int) -> None:
        b, K, N = self.bits, self.in_features, self.out_features
        self.register_buffer("weight", torch.zeros(b, N, -(-K // 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(groups, N))
        self.register_buffer("zero", torch.zeros(b, groups, -(-N // 8), dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, linear: QuantLinear | nn.Linear, weight: UniformWeight) -> IntegerLinear:
        """Pack a quantized layer with an integer record (codes in the rotated basis), its rotation,
        bias and activation settings. The packed weight must reproduce ``linear.weight`` exactly."""
        if weight.zero.min() < 0 or weight.zero.max() >= 2**weight.bits:
            raise ValueError(
                f"zero points outside [0, {2**weight.bits - 1}] (a group with all weights of one sign) do not fit "
                f"the packed {weight.bits}-bit format"
            )
        settings = cls.layer_settings(linear, weight.is_reordered())
        module = cls(group_size=weight.block_size, bits=weight.bits, **settings)
        w = pack_integer(
            weight.codes[:, weight.perm], weight.scale, weight.zero, bits=weight.bits, group_size=weight.block_size
        )
        return module._fill(linear, weight.perm, weight=w.codes, scale=w.scale, zero=w.zero)

    def settings(self) -> dict:
        return {**super().settings(), "kind": self.kind, "bits": self.bits}  # kind: see twla.deploy.linears

    def packed_weight(self) -> PackedInteger:
        return PackedInteger(self.weight, self.scale, self.zero, self.in_features, self.group_size)

    def dequantize(self) -> Tensor:
        W = dequantize_integer(self.packed_weight())
        return W if self.inverse_perm is None else W[:, self.inverse_perm]

    def _matmul(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.act(x), self.dequantize().to(x.dtype), b)

    def _describe_weight(self) -> str:
        return f"{self.bits}-bit codes, group_size={self.group_size}"
