"""Configuration objects: how weights are ternarized and how the pipeline runs.

A method is named by a spec string, a base quantizer plus modifiers:
``absmean``, ``twn``, ``pt2`` (PT²-LLM ATQ: ITF + AGA) or ``e2m`` (E2M-ATQ stage 1
ITF with TWLA's rule + exact S-metric stage 2), followed by ``+gptq`` (error
compensation) and/or ``+ssr`` (Structural Similarity Reordering),
e.g. ``e2m+gptq`` or ``pt2+gptq+ssr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from twla.solvers.ternary import ItfRule

Quantizer = Literal["absmean", "twn", "atq"]


@dataclass(frozen=True)
class TernaryConfig:
    """Ternarization of every linear weight in blocks of ``block_size`` input columns.

    quantizer: stage 1 fit per (row, block): ``absmean``, ``twn`` or ``atq`` (ITF).
    itf_rule / itf_iters: ITF code-update rule (``lsq`` PT²-LLM, ``twn`` TWLA) and iterations.
    refit: stage 2, the exact refit of (α, μ) in the layer-input metric (AGA / E2M).
    compensate: GPTQ error compensation; reorder: SSR block order; damp: λ of H = S + λ·mean(diag S)·I.
    """

    quantizer: Quantizer = "atq"
    itf_rule: ItfRule = "lsq"
    itf_iters: int = 10
    refit: bool = True
    block_size: int = 128
    compensate: bool = True
    reorder: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.quantizer not in ("absmean", "twn", "atq"):
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose absmean, twn or atq")
        if self.itf_rule not in ("lsq", "twn"):
            raise ValueError(f"unknown ITF rule {self.itf_rule!r}; choose lsq or twn")
        if self.block_size < 1 or self.itf_iters < 0 or self.damp < 0:
            raise ValueError("block_size must be ≥ 1, itf_iters ≥ 0 and damp ≥ 0")

    @property
    def has_offset(self) -> bool:
        """Whether the grid stores a per-(row, block) offset μ besides the scale α."""
        return self.quantizer == "atq" or self.refit


BASE_METHODS: dict[str, TernaryConfig] = {
    "absmean": TernaryConfig(quantizer="absmean", refit=False, compensate=False),
    "twn": TernaryConfig(quantizer="twn", refit=False, compensate=False),
    "pt2": TernaryConfig(quantizer="atq", itf_rule="lsq", itf_iters=10, refit=True, compensate=False),
    "e2m": TernaryConfig(quantizer="atq", itf_rule="twn", itf_iters=15, refit=True, compensate=False),
}
MODIFIERS = {"gptq": "compensate", "ssr": "reorder"}


def method_config(spec: str, **overrides: object) -> TernaryConfig:
    """Parse a method spec such as ``e2m+gptq+ssr`` into a :class:`TernaryConfig`."""
    base, *mods = spec.strip().lower().split("+")
    if base not in BASE_METHODS:
        raise ValueError(f"unknown method {spec!r}: base must be one of {', '.join(BASE_METHODS)}")
    flags = {}
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"unknown modifier {mod!r} in {spec!r}: choose from {', '.join(MODIFIERS)}")
        flags[MODIFIERS[mod]] = True
    return replace(BASE_METHODS[base], **flags, **overrides)


@dataclass(frozen=True)
class QuantConfig:
    """The whole post-training quantization run.

    true_sequential: quantize the input sites of a decoder layer one after another,
    each seeing the outputs of the already-quantized ones (GPTQ's true-sequential).
    batch_size: calibration sequences per forward pass.
    """

    weights: TernaryConfig = field(default_factory=TernaryConfig)
    true_sequential: bool = True
    batch_size: int = 8

    @classmethod
    def from_method(cls, spec: str, **kwargs: object) -> QuantConfig:
        return cls(weights=method_config(spec), **kwargs)
