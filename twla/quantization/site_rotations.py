"""One online rotation R = R₁ ⊗ R₂ per input site of every decoder layer, shared by the site's
linears: fixed (random Kronecker-Hadamard, random orthogonal) or learned with KOTMS, batched over
the layers (one Stiefel problem per site type), and kept per layer only where it beats its start;
the report of how the rotations shape the weights."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.models.adapters import Adapter, Site
from twla.models.capture import LayerInputs, collect_statistics
from twla.quantization.rotation import Factors, make_factors, site_weight
from twla.quantization.sections import ActivationConfig, KotmsConfig, RotationConfig
from twla.solvers.kotms import ERROR_KINDS, learn_kotms, site_errors, trimodality
from twla.solvers.kronecker import (
    kron_apply,
)

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun

LEARN_CHUNK_ELEMENTS = 2**25  # weight entries per batched KOTMS problem (memory bound)


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
        res = learn_kotms(
            W[sl],
            R1[sl],
            R2[sl],
            solver=cfg.solver,
            steps=cfg.steps,
            lr=cfg.lr,
            balance=cfg.balance,
            X=Xs,
            activation_weight=cfg.activation_weight,
        )
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
            factors[(index, site.name)] = make_factors(m, kind, generator, factors=cfg.factors.get(m))[0]
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


def sampled_rows(layer: nn.Module, adapter: Adapter, site: Site, *, cfg: KotmsConfig) -> Tensor:
    """The ``cfg.rows`` evenly spaced rows of the site's stacked weight that KOTMS learns on."""
    W = site_weight(layer, adapter, site)
    return W[torch.linspace(0, W.shape[0] - 1, min(cfg.rows, W.shape[0])).round().long()]


def learn_rotations(
    adapter: Adapter,
    rows: dict[tuple[int, str], Tensor],
    inputs: dict[tuple[int, str], Tensor],
    *,
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
    *,
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
            errors[name] = site_errors(w, x, R1, R2, bits=acts.bits, symmetric=acts.symmetric)
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
    *,
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
        (i, s.name): sampled_rows(layer, adapter, s, cfg=cfg.kotms)
        for i, layer in enumerate(layers)
        for s in adapter.sites
    }
    learned = learn_rotations(
        adapter, rows, inputs, rotations=rotations, report=report, cfg=cfg.kotms, progress=progress
    )
    for index, layer in enumerate(layers):
        choose_rotations(
            layer,
            index,
            adapter,
            rotations=rotations,
            learned=learned,
            inputs=inputs,
            cfg=cfg.kotms,
            acts=activations or ActivationConfig(),
            report=report,
        )
    return rotations, report


@torch.no_grad()
def record_shaping(
    report: RotationReport, layer: nn.Module, index: int, *, adapter: Adapter, rotations: dict, middle: int
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


@torch.no_grad()
def full_precision_samples(
    layers: Iterable[nn.Module],
    adapter: Adapter,
    batches: LayerInputs,
    *,
    tokens: int,
    device: torch.device,
    kotms: KotmsConfig | None = None,
) -> tuple[dict[tuple[int, str], Tensor], dict[tuple[int, str], Tensor]]:
    """About ``tokens`` input rows of every (layer, site) of the unquantized model (CPU, float32),
    running the decoder ``layers`` in turn on the calibration batches; with ``kotms``, also the
    site weights' rows that KOTMS learns on (:func:`sampled_rows`)."""
    samples, rows = {}, {}
    for index, layer in enumerate(layers):
        layer.to(device)
        for site in adapter.sites:
            first = adapter.site_linears(layer, site)[site.linears[0]]
            inputs = collect_statistics(layer, first, batches, keep=tokens, statistics=False)
            samples[(index, site.name)] = inputs.sample[:tokens].cpu()
            if kotms is not None:
                rows[(index, site.name)] = sampled_rows(layer, adapter, site, cfg=kotms).cpu()
        batches = batches.advance(layer)
        layer.to("cpu")
    return samples, rows


def start_site_rotations(run: QuantRun) -> None:
    """Stage: every site's starting rotation; for KOTMS, learned now on a pass over the
    full-precision layers (half of the input rows feed the activation term, half judge the learned
    rotations layer by layer, in :func:`choose_layer_rotations`)."""
    rot = run.config.rotation
    run.rotations, run.report.rotation = start_rotations(run.model, run.adapter, rot)
    if rot.site == "kotms":
        tokens = 2 * rot.kotms.activation_tokens
        walk = run.full_precision_layers()
        run.samples, rows = full_precision_samples(
            walk, run.adapter, run.batches, tokens=tokens, device=run.device, kotms=rot.kotms
        )
        run.learned = learn_rotations(
            run.adapter,
            rows,
            run.samples,
            rotations=run.rotations,
            report=run.report.rotation,
            cfg=rot.kotms,
            progress=run.progress,
        )


def choose_layer_rotations(run: QuantRun) -> None:
    """Stage, per layer (before it moves to the compute device): keep each learned rotation where
    it beats its start, and record how the rotations shape the weights."""
    if run.learned is not None:
        choose_rotations(
            run.layer,
            run.index,
            run.adapter,
            rotations=run.rotations,
            learned=run.learned,
            inputs=run.samples,
            cfg=run.config.rotation.kotms,
            acts=run.config.activations,
            report=run.report.rotation,
        )
    record_shaping(
        run.report.rotation,
        run.layer,
        run.index,
        adapter=run.adapter,
        rotations=run.rotations,
        middle=len(run.layers) // 2,
    )
