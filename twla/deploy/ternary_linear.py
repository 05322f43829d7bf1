"""The deployed linear layer: 2-bit packed ternary codes, run by the kernels of ``twla.kernels``.

    y = Q_a(x R)_π Ŵ_πᵀ + b,   Ŵ_π[n, k] = α_{g(k) n} t_{k n} + μ_{g(k) n},  t ∈ {−1, 0, 1},

where R = R₁ ⊗ R₂ is the online input rotation, π the column order of the
weight's blocks (SSR reordering; groups g are contiguous in π), and Q_a the per-token
activation quantizer with this layer's bits and clipping ratio. It computes
what :class:`twla.quantization.fake_quant.QuantLinear` computes with the weight on its ternary grid, from
the packed codes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twla.kernels.dispatch import ternary_linear
from twla.kernels.packing import PAD_BYTE, PackedTernary, check_group_size, dequantize, pack_ternary
from twla.kernels.reference import weight_sums
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant
from twla.quantization.fake_quant import online_rotation

if TYPE_CHECKING:
    from twla.quantization.fake_quant import QuantLinear
    from twla.quantization.weights import TernaryWeight


class TernaryLinear(nn.Module):
    """A linear layer on packed ternary codes with an optional online rotation and
    per-token activation quantization. Buffers ``weight`` (the packed codes, uint8 (⌈K/4⌉, N):
    a stock dense loader meets a shape it cannot take), ``alpha``, ``mu`` (and ``perm``,
    ``rot1``, ``rot2`` when present) are what a packed checkpoint stores; μ only with offsets,
    the rotation factors only on the first linear of a site (the others share them,
    :meth:`share_rotation`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        rotation: tuple[int, int] | None = None,
        reordered: bool = False,
        offset: bool = True,
        act: ActivationQuant = UNQUANTIZED,
        shared_rotation: bool = False,
    ) -> None:
        super().__init__()
        check_group_size(group_size)
        if rotation is not None and rotation[0] * rotation[1] != in_features:
            raise ValueError(f"rotation factors {rotation[0]}×{rotation[1]} do not match {in_features} inputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.act = act
        groups = -(-in_features // group_size)
        self.register_buffer("weight", torch.full((-(-in_features // 4), out_features), PAD_BYTE, dtype=torch.uint8))
        self.register_buffer("alpha", torch.zeros(groups, out_features))
        self.register_buffer("mu", torch.zeros(groups, out_features), persistent=offset)  # μ = 0 without offsets
        self.register_buffer("perm", torch.arange(in_features) if reordered else None)
        if shared_rotation and rotation is None:
            raise ValueError("a shared rotation needs the rotation's factor sizes")
        for factor, size in zip(("rot1", "rot2"), rotation or (None, None), strict=True):
            placeholder = None if size is None else torch.eye(size)
            self.register_buffer(factor, placeholder, persistent=not shared_rotation)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # derived from the stored buffers (exact for the placeholders: identity order, Ŵ = 0);
        # recomputed by refresh(), which loading a state dict calls
        self.register_buffer("inverse_perm", torch.arange(in_features) if reordered else None, persistent=False)
        self.register_buffer("wsum", torch.zeros(out_features), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())

    @classmethod
    def from_quantized(cls, linear: QuantLinear | nn.Linear, weight: TernaryWeight) -> TernaryLinear:
        """Pack a quantized layer (a :class:`QuantLinear`, or a plain linear for weight-only
        methods): its ternary record (codes in the rotated basis), rotation, bias and
        activation settings. The packed weight must reproduce ``linear.weight`` exactly."""
        if not weight.has_offset and weight.mu.any():
            raise ValueError("a ternary record without offsets has non-zero μ")
        perm = weight.perm
        reordered = weight.is_reordered()
        rot1, rot2 = getattr(linear, "rot1", None), getattr(linear, "rot2", None)
        rotation = (rot1.shape[-1], rot2.shape[-1]) if rot1 is not None else None
        module = cls(
            linear.in_features,
            linear.out_features,
            weight.block_size,
            linear.bias is not None,
            rotation,
            reordered,
            weight.has_offset,
            getattr(linear, "act", UNQUANTIZED),
        )
        w = pack_ternary(weight.codes[:, perm], weight.alpha, weight.mu, group_size=weight.block_size)
        with torch.no_grad():
            module.weight.copy_(w.packed)
            module.alpha.copy_(w.alpha)
            module.mu.copy_(w.mu)
            if reordered:
                module.perm.copy_(perm)
            if rotation:
                module.rot1.copy_(rot1)
                module.rot2.copy_(rot2)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.refresh()
        if not torch.equal(module.dequantize(), linear.weight.detach().float().cpu()):
            raise ValueError("the ternary record does not reproduce the layer's weight; was it quantized since?")
        return module.to(linear.weight.device)

    def settings(self) -> dict:
        """The constructor's arguments as JSON values (a packed checkpoint records them per linear)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "rotation": [self.rot1.shape[-1], self.rot2.shape[-1]] if self.rot1 is not None else None,
            "reordered": self.perm is not None,
            "offset": self.has_offset,
            "act_bits": self.act.bits,
            "act_clip": float(self.act.clip),
            "act_symmetric": self.act.symmetric,
            "shared_rotation": self.shares_rotation,
        }

    @classmethod
    def from_settings(cls, settings: dict) -> TernaryLinear:
        """An empty layer (placeholder buffers) from :meth:`settings`; KeyError, TypeError or
        ValueError name what is missing or wrong."""
        settings = dict(settings)
        act = ActivationQuant(*(settings.pop(f"act_{key}") for key in ("bits", "clip", "symmetric")))
        rotation = settings.pop("rotation")
        return cls(**settings, rotation=None if rotation is None else tuple(rotation), act=act)

    @property
    def has_offset(self) -> bool:
        return "mu" not in self._non_persistent_buffers_set

    @property
    def shares_rotation(self) -> bool:
        """Whether the rotation factors belong to another linear of the site (not stored here)."""
        return "rot1" in self._non_persistent_buffers_set

    def share_rotation(self, source: TernaryLinear) -> None:
        """Use ``source``'s rotation factors (the same tensors) and stop storing them here."""
        if (
            source.rot1 is None
            or self.rot1 is None
            or source.rot1.shape + source.rot2.shape != self.rot1.shape + self.rot2.shape
        ):
            raise ValueError("shared rotation factors must have the same sizes on both linears")
        self.rot1, self.rot2 = source.rot1, source.rot2
        self._non_persistent_buffers_set.update(("rot1", "rot2"))

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the derived buffers (inverse permutation, weight sums) after the stored ones
        change; ``load_state_dict`` calls it."""
        self.inverse_perm = None if self.perm is None else torch.argsort(self.perm)
        self.wsum = weight_sums(self.packed_weight())

    def packed_weight(self) -> PackedTernary:
        return PackedTernary(self.weight, self.alpha, self.mu, self.in_features, self.group_size)

    def dequantize(self) -> Tensor:
        """Ŵ (N, K) in float32, in the layer's (rotated) input order."""
        W = dequantize(self.packed_weight())
        return W if self.inverse_perm is None else W[:, self.inverse_perm]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = online_rotation(x, self.rot1, self.rot2)
        y = ternary_linear(
            x.reshape(-1, self.in_features),
            self.packed_weight(),
            act=self.act,
            perm=self.perm,
            inverse_perm=self.inverse_perm,
            wsum=self.wsum,
            bias=self.bias,
        )
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rot = f"{self.rot1.shape[-1]}⊗{self.rot2.shape[-1]}" if self.rot1 is not None else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"reordered={self.perm is not None}, rotation={rot}, {self.act.describe()}"
        )
