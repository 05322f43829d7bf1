"""Rotations of a whole model.

- Residual-stream rotation Q (QuaRot's R1), fused offline at zero run-time cost: every
  RMSNorm scale γ is folded into the layers that read it (W ← W diag(γ), γ ← 1); then
  E ← E Q, readers W ← W Q, writers (o_proj, down_proj) W ← Qᵀ W, lm_head ← lm_head Q.
  Tied embeddings are untied (the head carries the final norm's γ, the embedding does not).
- Per-site online rotations R = R₁ ⊗ R₂, one per input site of every decoder layer,
  shared by the site's linears: fixed (random Kronecker-Hadamard, random orthogonal) or
  learned with KOTMS, batched over the layers (one Stiefel problem per site type).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.models.adapters import Adapter, Site
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.sections import ActivationConfig, KotmsConfig, RotationConfig
from twla.solvers.kotms import ERROR_KINDS, learn_kotms, site_errors, trimodality
from twla.solvers.kronecker import (
    FactorWarning,
    kron_apply,
    kron_factors,
    random_hadamard,
    random_orthogonal,
)

Factors = tuple[Tensor, Tensor]
LEARN_CHUNK_ELEMENTS = 2**25  # weight entries per batched KOTMS problem (memory bound)


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
    m: int, kind: str, generator: torch.Generator, factors: tuple[int, int] | None = None
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


# ---------------------------------------------------------------- residual rotation (R1)


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


def residual_factors(model: nn.Module, adapter: Adapter, kind: str, seed: int = 0) -> Factors:
    """The fixed residual rotation Q = Q₁ ⊗ Q₂ (``hadamard`` or ``random``) for the model's width."""
    check_residual_rotation(adapter)
    hidden = model.get_submodule(adapter.embed).weight.shape[1]
    return make_factors(hidden, kind, torch.Generator().manual_seed(seed))[0]


def apply_residual_rotation(model: nn.Module, adapter: Adapter, kind: str, seed: int = 0) -> tuple[int, int]:
    """Fold the norms and rotate the residual stream by a fixed ``hadamard`` or ``random``
    Kronecker rotation; the model computes the same function. Returns the factor sizes."""
    Q1, Q2 = residual_factors(model, adapter, kind, seed)
    rotate_residual_ends(model, adapter, Q1, Q2)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        rotate_residual_layer(layer, index, adapter, Q1, Q2)
    return Q1.shape[0], Q2.shape[0]


# ---------------------------------------------------------------- per-site rotations


@dataclass
class SiteShaping:
    """Rotation of one site type across the layers: factor sizes, solver trace, tri-modality.

    fit_error: relative ternary fit error ‖WR − ATQ(WR)‖/‖W‖ per layer (before = R = I);
    zero_fraction: share of zero codes per layer; losses: KOTMS loss per step (mean over layers).
    For a learned rotation, errors: per layer the weight, activation and combined output errors
    (:func:`twla.solvers.kotms.site_errors`) of the ``fixed`` start and the ``learned`` rotation on
    calibration inputs the solver did not see; learned: per layer whether the learned one was kept.
    """

    site: str
    factors: tuple[int, int]
    kind: str
    fit_error_before: list[float] = field(default_factory=list)
    fit_error_after: list[float] = field(default_factory=list)
    zero_fraction_before: list[float] = field(default_factory=list)
    zero_fraction_after: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    learned: list[bool] = field(default_factory=list)


@dataclass
class RotationReport:
    """What the rotation stage did; ``weights`` holds (W, W R) of the middle layer per site for plots."""

    residual: str
    sites: dict[str, SiteShaping] = field(default_factory=dict)
    weights: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"residual": self.residual, "sites": {k: asdict(v) for k, v in self.sites.items()}}


def _learn_chunked(
    W: Tensor, R1: Tensor, R2: Tensor, cfg: KotmsConfig, X: Tensor | None
) -> tuple[Tensor, Tensor, list[float]]:
    """KOTMS on a batch of site weights (their sampled rows, :func:`sampled_rows`) and inputs, in
    chunks of layers that fit in memory."""
    chunk = max(1, LEARN_CHUNK_ELEMENTS // (W.shape[1] * W.shape[2]))
    out1, out2, traces = [], [], []
    for start in range(0, W.shape[0], chunk):
        sl = slice(start, start + chunk)
        Xs = None if X is None else X[sl]
        res = learn_kotms(W[sl], R1[sl], R2[sl], cfg.solver, cfg.steps, cfg.lr, cfg.balance, Xs, cfg.activation_weight)
        out1.append(res.R1)
        out2.append(res.R2)
        traces.append(torch.tensor(res.losses))
    losses = (torch.stack(traces).sum(0) / W.shape[0]).tolist()
    return torch.cat(out1), torch.cat(out2), losses


def start_factors(model: nn.Module, adapter: Adapter, cfg: RotationConfig) -> dict[tuple[int, str], Factors]:
    """The fixed rotation of every (layer, site), or KOTMS's start: drawn from ``cfg.seed`` site by
    site, layer by layer. Only the linears' shapes are read, so the layers' weights need not be loaded."""
    layers = adapter.decoder_layers(model)
    generator = torch.Generator().manual_seed(cfg.seed)
    kind = {"kotms": cfg.init, "none": "identity"}.get(cfg.site, cfg.site)
    factors = {}
    for site in adapter.sites:
        for index, layer in enumerate(layers):
            m = adapter.site_linears(layer, site)[site.linears[0]].in_features
            factors[(index, site.name)] = make_factors(m, kind, generator, cfg.factors.get(m))[0]
    return factors


def start_rotations(
    model: nn.Module, adapter: Adapter, cfg: RotationConfig
) -> tuple[dict[tuple[int, str], Factors], RotationReport]:
    """The fixed rotation of every (layer, site), or KOTMS's start (:func:`start_factors`), and a report
    with one :class:`SiteShaping` per site type."""
    start = time.perf_counter()
    rotations = start_factors(model, adapter, cfg)
    report = RotationReport(residual=cfg.residual)
    for site in adapter.sites:
        R1, R2 = rotations[(0, site.name)]
        report.sites[site.name] = SiteShaping(
            site.name, (R1.shape[0], R2.shape[0]), cfg.site, seconds=time.perf_counter() - start
        )
    return rotations, report


def sampled_rows(layer: nn.Module, adapter: Adapter, site: Site, cfg: KotmsConfig) -> Tensor:
    """The ``cfg.rows`` evenly spaced rows of the site's stacked weight that KOTMS learns on."""
    W = site_weight(layer, adapter, site)
    return W[torch.linspace(0, W.shape[0] - 1, min(cfg.rows, W.shape[0])).round().long()]


def learn_rotations(
    adapter: Adapter,
    rows: dict[tuple[int, str], Tensor],
    inputs: dict[tuple[int, str], Tensor],
    rotations: dict[tuple[int, str], Factors],
    report: RotationReport,
    cfg: KotmsConfig,
    progress: bool = True,
) -> dict[tuple[int, str], Factors]:
    """KOTMS per site type, one batched problem over the layers from ``rotations``' start: on the
    weights' sampled rows (:func:`sampled_rows`) and the even rows of the full-precision inputs."""
    count = len(rows) // len(adapter.sites)
    learned = {}
    for site in tqdm(adapter.sites, desc="rotations (kotms)", disable=not progress):
        start = time.perf_counter()
        W = torch.stack([rows[(i, site.name)] for i in range(count)])
        R1 = torch.stack([rotations[(i, site.name)][0] for i in range(count)])
        R2 = torch.stack([rotations[(i, site.name)][1] for i in range(count)])
        X = torch.stack([inputs[(i, site.name)] for i in range(count)])
        L1, L2, report.sites[site.name].losses = _learn_chunked(W, R1, R2, cfg, X[:, 0::2])
        report.sites[site.name].seconds = time.perf_counter() - start
        learned.update({(i, site.name): (L1[i], L2[i]) for i in range(count)})
    return learned


def choose_rotations(
    layer: nn.Module,
    index: int,
    adapter: Adapter,
    rotations: dict[tuple[int, str], Factors],
    learned: dict[tuple[int, str], Factors],
    inputs: dict[tuple[int, str], Tensor],
    cfg: KotmsConfig,
    acts: ActivationConfig,
    report: RotationReport,
) -> None:
    """For each site of layer ``index``, keep the learned rotation where it lowers the combined output
    error on the odd rows of its full-precision inputs, which the solver did not see (``cfg.gate``;
    else always), recording both rotations' errors (:func:`twla.solvers.kotms.site_errors`)."""
    for site in adapter.sites:
        key, shaping = (index, site.name), report.sites[site.name]
        w, x = site_weight(layer, adapter, site), inputs[(index, site.name)][1::2]
        errors = {}
        for name, (R1, R2) in (("fixed", rotations[key]), ("learned", learned[key])):
            errors[name] = site_errors(w, x, R1, R2, acts.bits, acts.symmetric)
            for kind, value in errors[name].items():
                shaping.errors.setdefault(name, {k: [] for k in ERROR_KINDS})[kind].append(value)
        keep = not cfg.gate or errors["learned"]["combined"] < errors["fixed"]["combined"]
        shaping.learned.append(keep)
        if keep:
            rotations[key] = learned[key]


def site_rotations(
    model: nn.Module,
    adapter: Adapter,
    cfg: RotationConfig,
    progress: bool = True,
    inputs: dict[tuple[int, str], Tensor] | None = None,
    activations: ActivationConfig | None = None,
) -> tuple[dict[tuple[int, str], Factors], RotationReport]:
    """One rotation per (layer, site) of a model in memory: fixed, or learned with KOTMS
    (:func:`learn_rotations`, then :func:`choose_rotations` per layer).

    inputs: full-precision calibration input rows per (layer, site), needed by KOTMS: the even
    rows feed its activation term, the odd rows judge the learned rotation against its start
    under ``activations`` (the quantization the layer-wise solve will use). The report's per-layer
    fit errors are filled by :func:`record_shaping` as each layer is quantized."""
    if cfg.site == "kotms" and inputs is None:
        raise ValueError("learned site rotations need calibration inputs per (layer, site) to judge them")
    rotations, report = start_rotations(model, adapter, cfg)
    if cfg.site != "kotms":
        return rotations, report
    layers = adapter.decoder_layers(model)
    rows = {
        (i, s.name): sampled_rows(layer, adapter, s, cfg.kotms) for i, layer in enumerate(layers) for s in adapter.sites
    }
    learned = learn_rotations(adapter, rows, inputs, rotations, report, cfg.kotms, progress)
    for index, layer in enumerate(layers):
        choose_rotations(
            layer, index, adapter, rotations, learned, inputs, cfg.kotms, activations or ActivationConfig(), report
        )
    return rotations, report


@torch.no_grad()
def record_shaping(
    report: RotationReport, layer: nn.Module, index: int, adapter: Adapter, rotations: dict, middle: int
) -> None:
    """Tri-modality of layer ``index``'s site weights before and after their rotation (call before
    the layer is quantized); the middle layer's weights are kept for plots."""
    for site in adapter.sites:
        W = site_weight(layer, adapter, site)
        Z = kron_apply(W, *rotations[(index, site.name)])
        shaping = report.sites[site.name]
        for (fit, zero), fits, zeros in (
            (trimodality(W), shaping.fit_error_before, shaping.zero_fraction_before),
            (trimodality(Z), shaping.fit_error_after, shaping.zero_fraction_after),
        ):
            fits.append(float(fit))
            zeros.append(float(zero))
        if index == middle:
            report.weights[site.name] = (W.float(), Z.float())


def install_rotation(layer: nn.Module, adapter: Adapter, site: Site, R1: Tensor | None, R2: Tensor | None) -> None:
    """Give every linear of the site the same online rotation (weights re-expressed: W ← W R)."""
    R1 = None if R1 is None else R1.float()
    R2 = None if R2 is None else R2.float()
    for module in adapter.site_linears(layer, site).values():
        module.set_rotation(R1, R2)
