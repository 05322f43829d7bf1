"""The deployed ternary linear: codes stored in base 3 (1.6 bits each), run by the kernels of
``twla.kernels`` from their 2-bit layout, derived once when the codes are loaded.

    y = Q_a(x R)_π Ŵ_πᵀ + b,   Ŵ_π[n, k] = α_{g(k) n} t_{k n} + μ_{g(k) n},  t ∈ {−1, 0, 1},

(:class:`~twla.deploy.packed_linear.PackedLinear` describes R, π, Q_a). It computes what
:class:`twla.quantization.fake_quant.QuantLinear` computes with the weight on its ternary grid,
from the packed codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twla.deploy.packed_linear import PackedLinear
from twla.kernels.dispatch import ternary_linear
from twla.kernels.packing import PAD_BYTE, PackedTernary, dequantize, pack_codes, pack_ternary
from twla.kernels.reference import weight_sums
from twla.kernels.trits import PAD_TRITS, pack_trits, trit_bytes, unpack_trits

if TYPE_CHECKING:
    from twla.quantization.fake_quant import QuantLinear
    from twla.quantization.weights import TernaryWeight


class TernaryLinear(PackedLinear):
    """A linear layer on packed ternary codes. Buffers ``weight`` (the codes in base 3, uint8
    (N, ⌈K/5⌉), :mod:`twla.kernels.trits`: a stock dense loader meets a shape it cannot take),
    ``alpha``, ``mu`` (and ``perm``, ``rot1``, ``rot2`` when present) are what a packed checkpoint
    stores; μ only with offsets. ``codes`` (uint8 (⌈K/4⌉, N), :mod:`twla.kernels.packing`) is
    derived from ``weight`` for the kernels."""

    kind = "ternary"
    half_tensors = ("alpha", "mu")

    def __init__(self, *args, offset: bool = True, **kwargs) -> None:
        self._offset = offset
        super().__init__(*args, **kwargs)

    def _register_weight(self, groups: int) -> None:
        K, N = self.in_features, self.out_features
        self.register_buffer("weight", torch.full((N, trit_bytes(K)), PAD_TRITS, dtype=torch.uint8))
        self.register_buffer("alpha", torch.zeros(groups, N))
        self.register_buffer("mu", torch.zeros(groups, N), persistent=self._offset)  # μ = 0 without offsets

    def _register_derived(self) -> None:
        K, N = self.in_features, self.out_features
        self.register_buffer("codes", torch.full((-(-K // 4), N), PAD_BYTE, dtype=torch.uint8), persistent=False)
        self.register_buffer("wsum", torch.zeros(N), persistent=False)

    @classmethod
    def from_quantized(cls, linear: QuantLinear | nn.Linear, weight: TernaryWeight) -> TernaryLinear:
        """Pack a quantized layer (a :class:`QuantLinear`, or a plain linear for weight-only
        methods): its ternary record (codes in the rotated basis), rotation, bias and
        activation settings. The packed weight must reproduce ``linear.weight`` exactly."""
        if not weight.has_offset and weight.mu.any():
            raise ValueError("a ternary record without offsets has non-zero μ")
        settings = cls.layer_settings(linear, weight.is_reordered())
        module = cls(group_size=weight.block_size, offset=weight.has_offset, **settings)
        codes = weight.codes[:, weight.perm]
        w = pack_ternary(codes, weight.alpha, weight.mu, group_size=weight.block_size)
        return module._fill(linear, weight.perm, weight=pack_trits(codes), alpha=w.alpha, mu=w.mu)

    def settings(self) -> dict:
        return {**super().settings(), "offset": self.has_offset}

    @property
    def has_offset(self) -> bool:
        return "mu" not in self._non_persistent_buffers_set

    @torch.no_grad()
    def refresh(self) -> None:
        super().refresh()
        self.codes = pack_codes(unpack_trits(self.weight, self.in_features), self.group_size)
        self.wsum = weight_sums(self.packed_weight())

    def packed_weight(self) -> PackedTernary:
        return PackedTernary(self.codes, self.alpha, self.mu, self.in_features, self.group_size)

    def dequantize(self) -> Tensor:
        W = dequantize(self.packed_weight())
        return W if self.inverse_perm is None else W[:, self.inverse_perm]

    def _matmul(self, x: Tensor) -> Tensor:
        return ternary_linear(
            x,
            self.packed_weight(),
            act=self.act,
            perm=self.perm,
            inverse_perm=self.inverse_perm,
            wsum=self.wsum,
            bias=self.bias,
        )
