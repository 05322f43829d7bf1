"""The packed linear formats by name: which module a checkpoint's settings build, and which one
packs a quantized weight record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twla.deploy.integer_linear import IntegerLinear
from twla.deploy.packed_linear import PackedLinear
from twla.deploy.ternary_linear import TernaryLinear

if TYPE_CHECKING:
    from torch import nn

    from twla.quantization.fake_quant import QuantLinear
    from twla.quantization.weights import QuantizedWeight

FORMATS: dict[str, type[PackedLinear]] = {cls.kind: cls for cls in (TernaryLinear, IntegerLinear)}


def linear_from_settings(settings: dict) -> PackedLinear:
    """An empty packed linear from a checkpoint's settings of it (``kind`` names the format; a
    linear without one is ternary, as every linear of format version 4 is)."""
    settings = dict(settings)
    kind = settings.pop("kind", TernaryLinear.kind)
    if kind not in FORMATS:
        raise ValueError(f"unknown packed linear format {kind!r}; this twla packs {', '.join(FORMATS)}")
    return FORMATS[kind].from_settings(settings)


def pack_linear(name: str, linear: QuantLinear | nn.Linear, weight: QuantizedWeight) -> PackedLinear:
    """The packed module of a quantized layer, in the format of its weight record."""
    if weight.packed_format not in FORMATS:
        raise NotImplementedError(
            f"{name}: the packed format stores plain ternary and integer weights; {type(weight).__name__} records "
            "(structured ternary) are not packed"
        )
    return FORMATS[weight.packed_format].from_quantized(linear, weight)
