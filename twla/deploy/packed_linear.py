"""What every deployed linear shares, whatever its weight format:

    y = Q_a(x R)_π Ŵ_πᵀ + b,

R = R₁ ⊗ R₂ the online input rotation (its factors stored on the first linear of a site and
shared by the others), π the column order of the weight's groups (``perm``, when they were
reordered), Q_a the per-token activation quantizer, b the bias. A format (ternary, integer)
is a subclass that stores Ŵ_π in its own buffers and says how to multiply by it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from twla.kernels.packing import check_group_size
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant
from twla.quantization.fake_quant import online_rotation

if TYPE_CHECKING:
    from twla.quantization.fake_quant import QuantLinear


class PackedLinear(nn.Module):
    """A linear layer on a packed weight; subclasses register their weight buffers in
    :meth:`_register_weight` (before the shared ones, so a checkpoint's tensors keep their order)
    and implement :meth:`dequantize` and :meth:`_matmul`."""

    kind: ClassVar[str]  # the format's name in a checkpoint's settings
    half_tensors: ClassVar[tuple[str, ...]]  # buffers stored as float16 (their values are float16)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        rotation: tuple[int, int] | None = None,
        reordered: bool = False,
        act: ActivationQuant = UNQUANTIZED,
        shared_rotation: bool = False,
    ) -> None:
        super().__init__()
        check_group_size(group_size)
        if rotation is not None and rotation[0] * rotation[1] != in_features:
            raise ValueError(f"rotation factors {rotation[0]}×{rotation[1]} do not match {in_features} inputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.act = act
        self._register_weight(-(-in_features // group_size))
        self.register_buffer("perm", torch.arange(in_features) if reordered else None)
        if shared_rotation and rotation is None:
            raise ValueError("a shared rotation needs the rotation's factor sizes")
        for factor, size in zip(("rot1", "rot2"), rotation or (None, None), strict=True):
            placeholder = None if size is None else torch.eye(size)
            self.register_buffer(factor, placeholder, persistent=not shared_rotation)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # derived from the stored buffers, recomputed by refresh(), which loading a state dict calls
        self.register_buffer("inverse_perm", torch.arange(in_features) if reordered else None, persistent=False)
        self._register_derived()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())

    def _register_weight(self, groups: int) -> None:
        raise NotImplementedError

    def _register_derived(self) -> None:
        """Non-persistent buffers computed from the weight (none by default)."""

    def _fill(self, linear: QuantLinear | nn.Linear, perm: Tensor, **packed: Tensor) -> PackedLinear:
        """Copy the ``packed`` weight buffers and the layer's rotation, column order and bias in,
        derive the buffers, check that the packed weight reproduces ``linear.weight`` exactly, and
        return the module on the layer's device."""
        with torch.no_grad():
            for name, value in packed.items():
                getattr(self, name).copy_(value)
            if self.perm is not None:
                self.perm.copy_(perm)
            if self.rot1 is not None:
                self.rot1.copy_(linear.rot1)
                self.rot2.copy_(linear.rot2)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.refresh()
        if not torch.equal(self.dequantize(), linear.weight.detach().float().cpu()):
            raise ValueError(f"the {self.kind} record does not reproduce the layer's weight; was it quantized since?")
        return self.to(linear.weight.device)

    @staticmethod
    def layer_settings(linear: QuantLinear | nn.Linear, reordered: bool) -> dict:
        """The shared constructor arguments of a quantized layer."""
        rot1, rot2 = getattr(linear, "rot1", None), getattr(linear, "rot2", None)
        return dict(
            in_features=linear.in_features,
            out_features=linear.out_features,
            bias=linear.bias is not None,
            rotation=(rot1.shape[-1], rot2.shape[-1]) if rot1 is not None else None,
            reordered=reordered,
            act=getattr(linear, "act", UNQUANTIZED),
        )

    def settings(self) -> dict:
        """The constructor's arguments as JSON values (a packed checkpoint records them per linear)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "rotation": [self.rot1.shape[-1], self.rot2.shape[-1]] if self.rot1 is not None else None,
            "reordered": self.perm is not None,
            "act_bits": self.act.bits,
            "act_clip": float(self.act.clip),
            "act_symmetric": self.act.symmetric,
            "shared_rotation": self.shares_rotation,
        }

    @classmethod
    def from_settings(cls, settings: dict) -> PackedLinear:
        """An empty layer (placeholder buffers) from :meth:`settings`; KeyError, TypeError or
        ValueError name what is missing or wrong."""
        settings = dict(settings)
        act = ActivationQuant(*(settings.pop(f"act_{key}") for key in ("bits", "clip", "symmetric")))
        rotation = settings.pop("rotation")
        return cls(**settings, rotation=None if rotation is None else tuple(rotation), act=act)

    @property
    def shares_rotation(self) -> bool:
        """Whether the rotation factors belong to another linear of the site (not stored here)."""
        return "rot1" in self._non_persistent_buffers_set

    def share_rotation(self, source: PackedLinear) -> None:
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
        """Recompute the derived buffers after the stored ones change; ``load_state_dict`` calls it."""
        self.inverse_perm = None if self.perm is None else torch.argsort(self.perm)

    def dequantize(self) -> Tensor:
        """Ŵ (N, K) in float32, in the layer's (rotated) input order."""
        raise NotImplementedError

    def _matmul(self, x: Tensor) -> Tensor:
        """Q_a(x) Ŵᵀ + b for x (M, K) in the rotated input basis, in x's dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = online_rotation(x, self.rot1, self.rot2)
        return self._matmul(x.reshape(-1, self.in_features)).reshape(*shape[:-1], self.out_features)

    def _describe_weight(self) -> str:
        return f"group_size={self.group_size}"

    def extra_repr(self) -> str:
        rot = f"{self.rot1.shape[-1]}⊗{self.rot2.shape[-1]}" if self.rot1 is not None else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self._describe_weight()}, "
            f"reordered={self.perm is not None}, rotation={rot}, {self.act.describe()}"
        )
