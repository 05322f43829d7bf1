"""The layer-wise solve of one decoder layer, input site by input site (the linears that read the
same input share its statistics and rotation):

1. the statistics S = XᵀX / N of the site's input are collected (and a token sample X);
2. optionally the site's rotation is relocated on the Stiefel manifold against the ternarized
   output error (E2M stage 2); the rotation is installed (W ← W R, S ← RᵀSR);
3. each linear is quantized against S (block fit, GPTQ, refit: :mod:`twla.quantization.weights`);
4. each linear's activation clipping ratio is calibrated (:mod:`twla.quantization.clipping`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twla.models.adapters import Adapter, Site
from twla.models.capture import LayerInputs, SiteInputs, collect_statistics
from twla.quantization.clipping import calibrate_clip
from twla.quantization.config import QuantConfig
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.records import LayerRecord
from twla.quantization.rotation import Factors, install_rotation, make_factors
from twla.quantization.weights import quantize_weight
from twla.solvers.kronecker import rotate_metric
from twla.solvers.relocation import relocate

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun


def _relative(error: float, energy: float) -> float:
    """error / energy, 0 for a layer without energy (an all-zero weight is quantized exactly)."""
    return error / energy if energy > 0 else 0.0


def clip_bits(name: str, config: QuantConfig) -> list[int]:
    """Bit-widths whose clipping ratio the linear ``name`` needs: its own, and every allocation option."""
    extra = config.allocation.clip_bits if config.allocation else ()
    return sorted({config.activations.bits_for(name), *extra} - {16})


def site_inputs(
    layer: nn.Module, index: int, adapter: Adapter, *, site: Site, batches: LayerInputs, config: QuantConfig
) -> SiteInputs:
    """The site's statistics, with a token sample when any of its linears quantizes activations."""
    acts = config.activations
    sample = any(clip_bits(f"{adapter.layers}.{index}.{path}", config) for path in site.linears)
    first = adapter.site_linears(layer, site)[site.linears[0]]
    return collect_statistics(layer, first, batches, keep=acts.calibration_tokens if sample else 0)


def _relocate(
    layer: nn.Module, adapter: Adapter, site: Site, S: Tensor, rotation: Factors | None, config: QuantConfig
) -> tuple[Factors, dict[str, float]]:
    """E2M stage 2, part 1: refine the site's factors against its ternarized output error."""
    rot = config.rotation
    modules = list(adapter.site_linears(layer, site).values())
    if rotation is None:
        rotation, _ = make_factors(
            modules[0].in_features, "identity", torch.Generator(), factors=rot.factors.get(S.shape[0])
        )
    res = relocate(
        [m.original_weight() for m in modules],
        S,
        *rotation,
        solver=rot.relocation.solver,
        steps=rot.relocation.steps,
        lr=rot.relocation.lr,
        block_size=config.weights.block_size,
    )
    return (res.R1, res.R2), {"before": res.losses[0], "after": res.losses[-1]}


def _calibrate_clipping(
    linear: QuantLinear, sample: Tensor, W: Tensor, W_hat: Tensor, name: str, config: QuantConfig
) -> tuple[float, dict[str, float] | None, dict[int, float] | None]:
    """The clipping ratio of every bit-width the linear may run at, set on it; returns the ratio at
    its own bits, the output error there without and with clipping, and every bit-width's ratio."""
    acts = config.activations
    bits = acts.bits_for(name)
    choices = {
        b: calibrate_clip(linear.rotate_input(sample), W, W_hat, bits=b, symmetric=acts.symmetric, grid=acts.clip_grid)
        for b in clip_bits(name, config)
    }
    clip, act_error = 1.0, None
    if choices:
        linear.act_clips = {b: c.clip for b, c in choices.items()}
        linear.act = replace(linear.act, symmetric=acts.symmetric)
        linear.set_act_bits(bits)
    if bits < 16:
        chosen = choices[bits]
        clip, act_error = chosen.clip, {"clip=1": chosen.errors[1.0], "calibrated": chosen.error}
    return clip, act_error, {b: c.clip for b, c in choices.items()} or None


def _quantize_linear(
    linear: nn.Module, name: str, site: Site, index: int, S: Tensor, sample: Tensor, run: QuantRun
) -> LayerRecord:
    """Quantize one linear's weight against S in place, calibrate its clipping; its record."""
    start = time.perf_counter()
    config = run.config
    W = linear.weight.detach().to(S.device, torch.float64)
    tw, res = quantize_weight(W, S, run.weights_for(name))
    W_hat = tw.dequantize(torch.float64).to(S.device)
    E = W - W_hat
    energy_s = float(((W @ S) * W).sum())
    energy_h = energy_s + config.weights.damp * float(torch.diagonal(S).mean()) * float((W**2).sum())
    wnorm = float((W**2).sum())
    stages = {
        stage: {
            "weight_error": _relative(res.stage_weight_error[stage], wnorm),
            "output_error": _relative(res.stage_output_error[stage], energy_h),
        }
        for stage in res.stage_weight_error
    }
    linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
    run.report.weights[name] = tw
    clip, act_error, act_clips = _calibrate_clipping(linear, sample, W, W_hat, name, config)
    return LayerRecord(
        name=name,
        layer=index,
        site=site.name,
        shape=tw.shape,
        weight_error=_relative(float((E**2).sum()), wnorm),
        output_error=_relative(float(((E @ S) * E).sum()), energy_s),
        stages=stages,
        seconds=time.perf_counter() - start,
        act_bits=config.activations.bits_for(name),
        act_clip=clip,
        act_error=act_error,
        act_clips=act_clips,
    )


def quantize_site(run: QuantRun, site: Site, inputs: SiteInputs) -> None:
    """Steps 2–4 for one site of the current layer, each linear's record added to the report."""
    start = time.perf_counter()
    layer, index, adapter, config = run.layer, run.index, run.adapter, run.config
    S, rotation, relocation = inputs.S, run.rotations.get((index, site.name)), None
    if config.rotation.relocation is not None:
        rotation, relocation = _relocate(layer, adapter, site, S, rotation, config)
    rot_name = "none"
    if rotation is not None:
        install_rotation(layer, adapter, site, *rotation)
        R1, R2 = (r.to(S) for r in rotation)
        S = rotate_metric(S, R1, R2)
        rot_name = f"{R1.shape[0]}⊗{R2.shape[0]}"
    setup_seconds = time.perf_counter() - start
    for path, linear in adapter.site_linears(layer, site).items():
        record = _quantize_linear(linear, f"{adapter.layers}.{index}.{path}", site, index, S, inputs.sample, run)
        record.seconds += setup_seconds / len(site.linears)
        record.rotation, record.relocation = rot_name, relocation
        run.report.records.append(record)


def quantize_sites(run: QuantRun) -> None:
    """Stage, per layer: the layer-wise solve of every input site (module docstring). With
    ``true_sequential`` each site sees the outputs of the sites quantized before it; otherwise
    every site's statistics come from the full-precision layer."""
    run.layer.to(run.device)
    sites = run.adapter.sites
    early = {} if run.config.true_sequential else {s.name: _inputs(run, s) for s in sites}
    for site in sites:
        quantize_site(run, site, early.get(site.name) or _inputs(run, site))


def _inputs(run: QuantRun, site: Site) -> SiteInputs:
    return site_inputs(run.layer, run.index, run.adapter, site=site, batches=run.batches, config=run.config)
