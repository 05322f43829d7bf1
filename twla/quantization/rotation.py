"""Rotations of a whole model: Kronecker factors, and the residual-stream rotation Q (QuaRot's R1),
fused offline at zero run-time cost: every RMSNorm scale γ is folded into the layers that read it
(W ← W diag(γ), γ ← 1); then E ← E Q, readers W ← W Q, writers (o_proj, down_proj) W ← Qᵀ W,
lm_head ← lm_head Q. Tied embeddings are untied (the head carries the final norm's γ, the
embedding does not). Installing a site's online rotation (:mod:`twla.quantization.site_rotations`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twla.models.adapters import Adapter, Site
from twla.quantization.fake_quant import QuantLinear
from twla.solvers.kronecker import (
    FactorWarning,
    kron_apply,
    kron_factors,
    random_hadamard,
    random_orthogonal,
)

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun

Factors = tuple[Tensor, Tensor]


def _orthogonal_factor(n: int, kind: str, generator: torch.Generator) -> Tensor:
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    if kind == "hadamard":
        H = random_hadamard(n, generator)
        if H is not None:
            return H
        warnings.warn(
            f"no Hadamard matrix of order {n} is constructed (orders 1, 2 and Paley/Sylvester multiples of 4); "
            "using a random orthogonal factor instead",
            FactorWarning,
            stacklevel=3,
        )
    return random_orthogonal(n, generator)


def make_factors(
    m: int, kind: str, generator: torch.Generator, *, factors: tuple[int, int] | None = None
) -> tuple[Factors, tuple[int, int]]:
    """Starting factors (R₁, R₂) for dimension m: ``identity``, ``random`` or ``hadamard``."""
    m1, m2 = kron_factors(m, factors)
    return (_orthogonal_factor(m1, kind, generator), _orthogonal_factor(m2, kind, generator)), (m1, m2)


def _linear_weight(module: nn.Module) -> Tensor:
    """A linear's weight in its own input basis (undoing an online rotation)."""
    return module.original_weight() if isinstance(module, QuantLinear) else module.weight.detach().double()


def site_weight(layer: nn.Module, adapter: Adapter, site: Site) -> Tensor:
    """The site's linears' weights stacked by rows (Σ n_k × m), in the site's input basis."""
    return torch.cat([_linear_weight(m) for m in adapter.site_linears(layer, site).values()], dim=0)


def _norm_scale(norm: nn.Module, where: str) -> nn.Parameter:
    if getattr(norm, "bias", None) is not None or not isinstance(getattr(norm, "weight", None), nn.Parameter):
        raise NotImplementedError(f"{where}: only RMSNorm-style norms (a scale, no bias) can be folded")
    return norm.weight


@torch.no_grad()
def _untie_head(model: nn.Module, adapter: Adapter) -> None:
    head = model.get_submodule(adapter.head)
    if head.weight is model.get_submodule(adapter.embed).weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _fold(gamma: nn.Parameter, linears: list[nn.Module]) -> None:
    """W ← W diag(γ) for every linear reading the norm's output, γ ← 1."""
    for linear in linears:
        if isinstance(linear, QuantLinear) and linear.rotated:
            raise RuntimeError("fold norms before installing online rotations")
        linear.weight.mul_(gamma.to(linear.weight.dtype))
    gamma.fill_(1.0)


def _rotate_right(p: Tensor, Q1: Tensor, Q2: Tensor) -> None:
    """p ← p Q for a tensor whose rows live in the residual space."""
    p.copy_(kron_apply(p.double(), Q1, Q2).to(p.dtype))


@torch.no_grad()
def rotate_residual_ends(model: nn.Module, adapter: Adapter, Q1: Tensor, Q2: Tensor) -> None:
    """The residual rotation outside the decoder layers: untie the head, fold the final norm into
    it, and rotate the embedding and the head (E ← E Q, lm_head ← lm_head diag(γ) Q)."""
    _untie_head(model, adapter)
    head = model.get_submodule(adapter.head)
    _fold(_norm_scale(model.get_submodule(adapter.final_norm), adapter.final_norm), [head])
    _rotate_right(model.get_submodule(adapter.embed).weight, Q1, Q2)
    _rotate_right(head.weight, Q1, Q2)


@torch.no_grad()
def rotate_residual_layer(layer: nn.Module, index: int, adapter: Adapter, Q1: Tensor, Q2: Tensor) -> None:
    """The residual rotation of one decoder layer: fold each norm's scale into the linears reading
    it, then readers W ← W Q, writers W ← Qᵀ W (and their bias b ← b Q)."""
    for site in adapter.sites:
        linears = list(adapter.site_linears(layer, site).values())
        if site.norm is not None:
            _fold(_norm_scale(layer.get_submodule(site.norm), f"layer {index} {site.norm}"), linears)
        for linear in linears:
            if site.writes_residual:
                linear.weight.copy_(kron_apply(linear.weight.double().T, Q1, Q2).T.to(linear.weight.dtype))
                if linear.bias is not None:
                    _rotate_right(linear.bias[None], Q1, Q2)
            elif site.norm is not None:
                _rotate_right(linear.weight, Q1, Q2)


def check_residual_rotation(adapter: Adapter) -> None:
    """Refuse an offline residual rotation where the norms cannot be folded into the readers."""
    if not adapter.residual_rotation:
        raise ValueError(
            f"{adapter.family}: the residual stream cannot be rotated offline (norms after the sublayers, "
            f"{', '.join(adapter.post_norms) or 'none'}; RMSNorm scale {adapter.norm_offset:g} + w); "
            "use the online site rotations (+had, +rand, +kotms) instead of +r1"
        )


def residual_factors(model: nn.Module, adapter: Adapter, kind: str, *, seed: int = 0) -> Factors:
    """The fixed residual rotation Q = Q₁ ⊗ Q₂ (``hadamard`` or ``random``) for the model's width."""
    check_residual_rotation(adapter)
    hidden = model.get_submodule(adapter.embed).weight.shape[1]
    return make_factors(hidden, kind, torch.Generator().manual_seed(seed))[0]


def apply_residual_rotation(model: nn.Module, adapter: Adapter, kind: str, *, seed: int = 0) -> tuple[int, int]:
    """Fold the norms and rotate the residual stream by a fixed ``hadamard`` or ``random``
    Kronecker rotation; the model computes the same function. Returns the factor sizes."""
    Q1, Q2 = residual_factors(model, adapter, kind, seed=seed)
    rotate_residual_ends(model, adapter, Q1, Q2)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        rotate_residual_layer(layer, index, adapter, Q1, Q2)
    return Q1.shape[0], Q2.shape[0]


def install_rotation(layer: nn.Module, adapter: Adapter, site: Site, R1: Tensor | None, R2: Tensor | None) -> None:
    """Give every linear of the site the same online rotation (weights re-expressed: W ← W R)."""
    R1 = None if R1 is None else R1.float()
    R2 = None if R2 is None else R2.float()
    for module in adapter.site_linears(layer, site).values():
        module.set_rotation(R1, R2)


def rotate_residual(run: QuantRun) -> None:
    """Stage: the residual-stream rotation, fused into the embedding and head now and into each
    decoder layer as it is prepared."""
    rot = run.config.rotation
    run.residual = residual_factors(run.model, run.adapter, rot.residual, seed=rot.seed)
    rotate_residual_ends(run.model, run.adapter, *run.residual)
