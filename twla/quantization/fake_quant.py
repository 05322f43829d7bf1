"""The quantized linear layer of a rotated, activation-quantized model (fake-quantized).

    y = Q_a(x R) Ŵᵀ + b,   R = R₁ ⊗ R₂ (online),  Ŵ stored in the rotated basis,

where Q_a is per-token dynamic quantization with this layer's bits and clipping ratio.
Without a rotation and at 16 bits it is exactly the original linear.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from twla.kernels.uniform import UNQUANTIZED
from twla.models.adapters import Adapter
from twla.solvers.kronecker import kron_apply, kron_apply_t

ROTATION_BUFFERS = ("rot1", "rot2")


def online_rotation(x: Tensor, R1: Tensor | None, R2: Tensor | None) -> Tensor:
    """x (R₁ ⊗ R₂) in x's dtype, or x itself without a rotation. One token (decoding) takes two
    small 2-D products R₁ᵀ X R₂, half the cost of the batched ones."""
    if R1 is None:
        return x
    if R1.dtype != x.dtype:
        R1, R2 = R1.to(x.dtype), R2.to(x.dtype)
    if x.numel() == x.shape[-1] and R1.ndim == 2:
        return torch.mm(torch.mm(R1.T, x.reshape(R1.shape[0], R2.shape[0])), R2).view(x.shape)
    return kron_apply(x, R1, R2)


class QuantLinear(nn.Module):
    """A linear layer with an optional online Kronecker input rotation and activation quantization."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.rot1: Tensor | None
        self.rot2: Tensor | None
        self.register_buffer("rot1", None)
        self.register_buffer("rot2", None)
        self.act = UNQUANTIZED
        self.act_clips: dict[int, float] = {}  # calibrated clipping ratio per bit-width

    def set_act_bits(self, bits: int) -> None:
        """Quantize inputs to ``bits`` with that width's calibrated clipping ratio (1 if none)."""
        self.act = replace(self.act, bits=bits, clip=self.act_clips.get(bits, 1.0))

    @property
    def rotated(self) -> bool:
        return self.rot1 is not None

    def rotate_input(self, x: Tensor) -> Tensor:
        """x R (identity without a rotation)."""
        return online_rotation(x, self.rot1, self.rot2)

    def original_weight(self) -> Tensor:
        """The weight in the layer's input basis, W = W_stored Rᵀ (float64)."""
        W = self.weight.detach().to(torch.float64)
        if self.rot1 is None:
            return W
        return kron_apply_t(W, self.rot1.to(W), self.rot2.to(W))

    @torch.no_grad()
    def set_rotation(self, R1: Tensor | None, R2: Tensor | None) -> None:
        """Replace the input rotation and re-express the weight in the new basis (W ← W R).

        Pass the same factor tensors to every layer of a site so they are stored once.
        """
        W = self.original_weight()
        if R1 is not None:
            W = kron_apply(W, R1.to(W), R2.to(W))
        self.weight.copy_(W.to(self.weight.dtype))
        self.rot1, self.rot2 = R1, R2

    def quantize_input(self, x: Tensor) -> Tensor:
        """Q_a(x R): the input the weight actually sees."""
        return self.act(self.rotate_input(x))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        rot = f"{self.rot1.shape[-1]}⊗{self.rot2.shape[-1]}" if self.rotated else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rotation={rot}, {self.act.describe()}"
        )


def wrap_layer(layer: nn.Module, index: int, adapter: Adapter) -> dict[str, QuantLinear]:
    """Replace every site linear of decoder layer ``index`` by a :class:`QuantLinear` (sharing its
    parameters), in place; returns them by full name. Already wrapped linears are kept."""
    modules: dict[str, QuantLinear] = {}
    for path in adapter.linear_names():
        module = layer.get_submodule(path)
        if not isinstance(module, QuantLinear):
            module = QuantLinear(module)
            layer.set_submodule(path, module)
        modules[f"{adapter.layers}.{index}.{path}"] = module
    return modules


def wrap_linears(model: nn.Module, adapter: Adapter) -> dict[str, QuantLinear]:
    """:func:`wrap_layer` for every decoder layer of ``model``."""
    modules: dict[str, QuantLinear] = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        modules.update(wrap_layer(layer, index, adapter))
    return modules
