"""Layer-wise sequential post-training quantization (GPTQ's schedule).

Before the layers: the optional residual rotation (norms folded), and the per-site
rotations (fixed, or learned with KOTMS on a first pass over the full-precision layers and
kept per layer where they beat their start). Then the calibration batch runs
through the model one decoder layer at a time. For each input site of the layer:

1. the statistics S = XᵀX / N of its input are collected (and a token sample X);
2. optionally the site's rotation is relocated on the Stiefel manifold against the
   ternarized output error (E2M stage 2), and installed (W ← W R, S ← RᵀSR);
3. its linears are quantized against S (block fit, GPTQ, refit);
4. each linear's activation clipping ratio is calibrated;

optionally (``recon``) the whole block's grids, norm gains and clipping ratios are then
tuned against the full-precision block's outputs (:mod:`twla.quantization.reconstruct`), and the
*quantized* layer's outputs feed the next layer. Only the current decoder
layer sits on the compute device (with a :class:`LayerStream`, only it is in memory at all,
every pass included). After the last layer, optionally (``e2e``) the same
parameters of all blocks are tuned at once against the full-precision model's next-token
distribution (its log-probabilities taken before any change), then (ILA-AMP) the
activation bit-widths are allocated."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.models.adapters import Adapter, Site, get_adapter
from twla.models.capture import (
    KeptLayers,
    LayerInputs,
    SiteInputs,
    capture_layer_inputs,
    collect_statistics,
    layers_replaced,
    reloading,
)
from twla.models.loading import resolve_device
from twla.quantization.allocation import allocate, cost_windows
from twla.quantization.clipping import calibrate_clip
from twla.quantization.config import QuantConfig
from twla.quantization.fake_quant import QuantLinear, wrap_layer
from twla.quantization.reconstruct import (
    block_targets,
    reconstruct_block,
    reconstruct_model,
    split_windows,
    teacher_log_probs,
)
from twla.quantization.records import LayerRecord, QuantReport
from twla.quantization.rotation import (
    Factors,
    check_residual_rotation,
    choose_rotations,
    install_rotation,
    learn_rotations,
    make_factors,
    record_shaping,
    residual_factors,
    rotate_residual_ends,
    rotate_residual_layer,
    sampled_rows,
    start_rotations,
)
from twla.quantization.sections import KotmsConfig
from twla.quantization.weights import QuantizedWeight, quantize_weight
from twla.solvers.kronecker import rotate_metric
from twla.solvers.relocation import relocate


def check_finite(tensor: Tensor, name: str) -> None:
    """Refuse the model tensor ``name`` if it holds NaN or inf."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values; refusing to quantize")


def check_finite_tensors(model: nn.Module) -> None:
    """Refuse a model any of whose tensors (parameters and stored buffers) holds NaN or inf."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_meta:
            check_finite(tensor, name)


def _site_inputs(
    layer: nn.Module, index: int, adapter: Adapter, site: Site, batches: LayerInputs, config: QuantConfig
) -> SiteInputs:
    """The site's statistics, with a token sample when any of its linears quantizes activations."""
    acts = config.activations
    sample = any(_clip_bits(f"{adapter.layers}.{index}.{path}", config) for path in site.linears)
    first = adapter.site_linears(layer, site)[site.linears[0]]
    return collect_statistics(layer, first, batches, acts.calibration_tokens if sample else 0)


def _relative(error: float, energy: float) -> float:
    """error / energy, 0 for a layer without energy (an all-zero weight is quantized exactly)."""
    return error / energy if energy > 0 else 0.0


def _clip_bits(name: str, config: QuantConfig) -> list[int]:
    """Bit-widths whose clipping ratio the linear ``name`` needs: its own, and every allocation option."""
    extra = config.allocation.clip_bits if config.allocation else ()
    return sorted({config.activations.bits_for(name), *extra} - {16})


def _relocate_site(
    layer: nn.Module, adapter: Adapter, site: Site, S: Tensor, rotation: Factors | None, config: QuantConfig
) -> tuple[Factors, dict[str, float]]:
    """E2M stage 2, part 1: refine the site's factors against its ternarized output error."""
    rot = config.rotation
    modules = list(adapter.site_linears(layer, site).values())
    if rotation is None:
        rotation, _ = make_factors(modules[0].in_features, "identity", torch.Generator(), rot.factors.get(S.shape[0]))
    res = relocate(
        [m.original_weight() for m in modules],
        S,
        *rotation,
        rot.relocation.solver,
        rot.relocation.steps,
        rot.relocation.lr,
        config.weights.block_size,
    )
    return (res.R1, res.R2), {"before": res.losses[0], "after": res.losses[-1]}


def _quantize_site(
    layer: nn.Module,
    index: int,
    adapter: Adapter,
    site: Site,
    inputs: SiteInputs,
    rotation: Factors | None,
    config: QuantConfig,
    report: QuantReport,
) -> None:
    start = time.perf_counter()
    S = inputs.S
    relocation = None
    if config.rotation.relocation is not None:
        rotation, relocation = _relocate_site(layer, adapter, site, S, rotation, config)
    rot_name = "none"
    if rotation is not None:
        install_rotation(layer, adapter, site, *rotation)
        R1, R2 = (r.to(S) for r in rotation)
        S = rotate_metric(S, R1, R2)
        rot_name = f"{R1.shape[0]}⊗{R2.shape[0]}"
    setup_seconds = time.perf_counter() - start
    for path, linear in adapter.site_linears(layer, site).items():
        start = time.perf_counter()
        name = f"{adapter.layers}.{index}.{path}"
        W = linear.weight.detach().to(S.device, torch.float64)
        tw, res = quantize_weight(W, S, config.weights)
        W_hat = tw.dequantize(torch.float64).to(S.device)
        E = W - W_hat
        energy_s = float(((W @ S) * W).sum())
        energy_h = energy_s + config.weights.damp * float(torch.diagonal(S).mean()) * float((W**2).sum())
        wnorm = float((W**2).sum())
        stages = {
            name: {
                "weight_error": _relative(res.stage_weight_error[name], wnorm),
                "output_error": _relative(res.stage_output_error[name], energy_h),
            }
            for name in res.stage_weight_error
        }
        linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
        report.weights[name] = tw
        bits = config.activations.bits_for(name)
        acts = config.activations
        choices = {
            b: calibrate_clip(linear.rotate_input(inputs.sample), W, W_hat, b, acts.symmetric, acts.clip_grid)
            for b in _clip_bits(name, config)
        }
        clip, act_error = 1.0, None
        if choices:
            linear.act_clips = {b: c.clip for b, c in choices.items()}
            linear.act = replace(linear.act, symmetric=acts.symmetric)
            linear.set_act_bits(bits)
        if bits < 16:
            chosen = choices[bits]
            clip, act_error = chosen.clip, {"clip=1": chosen.errors[1.0], "calibrated": chosen.error}
        report.records.append(
            LayerRecord(
                name=name,
                layer=index,
                site=site.name,
                shape=tw.shape,
                weight_error=_relative(float((E**2).sum()), wnorm),
                output_error=_relative(float(((E @ S) * E).sum()), energy_s),
                stages=stages,
                seconds=time.perf_counter() - start + setup_seconds / len(site.linears),
                rotation=rot_name,
                relocation=relocation,
                act_bits=bits,
                act_clip=clip,
                act_error=act_error,
                act_clips={b: c.clip for b, c in choices.items()} or None,
            )
        )


def _refresh_clips(layer: nn.Module, index: int, adapter: Adapter, records: list[LayerRecord]) -> None:
    """Copy a block's clipping ratios (after reconstruction tuned them) into its records."""
    for record in records:
        if record.layer == index:
            module = layer.get_submodule(record.name.removeprefix(f"{adapter.layers}.{index}."))
            if isinstance(module, QuantLinear) and module.act_clips:
                record.act_clips = dict(module.act_clips)
                record.act_clip = module.act_clips.get(record.act_bits, 1.0)


@torch.no_grad()
def full_precision_samples(
    layers: Iterable[nn.Module],
    adapter: Adapter,
    batches: LayerInputs,
    tokens: int,
    device: torch.device,
    kotms: KotmsConfig | None = None,
) -> tuple[dict[tuple[int, str], Tensor], dict[tuple[int, str], Tensor]]:
    """About ``tokens`` input rows of every (layer, site) of the unquantized model (CPU, float32),
    running the decoder ``layers`` in turn on the calibration batches; with ``kotms``, also the
    site weights' rows that KOTMS learns on (:func:`twla.quantization.rotation.sampled_rows`)."""
    samples, rows = {}, {}
    for index, layer in enumerate(layers):
        layer.to(device)
        for site in adapter.sites:
            first = adapter.site_linears(layer, site)[site.linears[0]]
            inputs = collect_statistics(layer, first, batches, tokens, statistics=False)
            samples[(index, site.name)] = inputs.sample[:tokens].cpu()
            if kotms is not None:
                rows[(index, site.name)] = sampled_rows(layer, adapter, site, kotms).cpu()
        batches = batches.advance(layer)
        layer.to("cpu")
    return samples, rows


class LayerStream(KeptLayers, Protocol):
    """Where :func:`quantize` gets each decoder layer from and where it puts it when done, for a
    model whose layers are not all in memory (:mod:`twla.quantization.streaming`): ``load`` gives layer
    ``index`` with its full-precision weights on the CPU, ``unload`` drops it again, ``release``
    takes it once quantized, for good (packed) or, with ``keep``, kept while a whole-model stage
    (end-to-end reconstruction, bit allocation) still changes it: ``reload`` brings a kept layer
    back, ``store`` keeps it again and ``finish`` takes it for good."""

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module, report: QuantReport, keep: bool) -> None: ...

    def store(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None: ...

    def finish(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None: ...


def _loaded_layers(stream: LayerStream, count: int, prepare: Callable[[nn.Module, int], None]) -> Iterator[nn.Module]:
    """The full-precision decoder layers of ``stream`` one at a time, each prepared (residual rotation,
    wrapping) and dropped again when the next is asked for."""
    for index in range(count):
        layer = stream.load(index)
        prepare(layer, index)
        yield layer
        stream.unload(index, layer)


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Tensor,
    device: str | torch.device | None = None,
    progress: bool = True,
    stream: LayerStream | None = None,
    offload: bool = False,
) -> tuple[nn.Module, QuantReport]:
    """Quantize every linear layer of the decoder blocks in place (fake-quantized weights;
    with rotations or activation quantization the linears become :class:`QuantLinear`).

    calibration: token ids, shape (nsamples, seqlen). Returns the model and a report.
    stream: the decoder layers come from and go to it one at a time (``model`` holds them
    without weights, on the meta device); the stream checks their weights before the work.
    offload: the calibration activations between layers wait in host memory, not on ``device``
    (the results are the same).
    """
    adapter = get_adapter(model)
    if config.rotation.residual != "none":
        check_residual_rotation(adapter)
    if stream is None:
        check_finite_tensors(model)
    if calibration.ndim != 2 or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty (nsamples, seqlen) tensor of token ids")
    if config.allocation:
        cost_windows(calibration, config.allocation)  # fail before the work, not after it
    config.check_windows(calibration.shape[0])
    device = resolve_device(device)
    report = QuantReport(config, calibration_tokens=calibration.numel())
    start = time.perf_counter()
    teacher = None
    if config.end_to_end:
        with (
            nullcontext()
            if stream is None
            else layers_replaced(model, adapter, reloading(stream.load, stream.unload, device))
        ):
            teacher = teacher_log_probs(model, calibration, config.end_to_end.stride, device, progress)
    rot = config.rotation
    residual = residual_factors(model, adapter, rot.residual, rot.seed) if rot.residual != "none" else None
    if residual is not None:
        rotate_residual_ends(model, adapter, *residual)
    wrap = rot.online or config.activations.quantized or config.allocation is not None
    layers = adapter.decoder_layers(model)

    def prepare(layer: nn.Module, index: int) -> None:
        if residual is not None:
            rotate_residual_layer(layer, index, adapter, *residual)
        if wrap:
            wrap_layer(layer, index, adapter)

    if stream is None:
        for index, layer in enumerate(layers):
            prepare(layer, index)
    rotations: dict[tuple[int, str], Factors] = {}
    learned = None
    capture_start = time.perf_counter()
    batches = capture_layer_inputs(model, adapter, calibration, config.batch_size, device, offload)
    capture_seconds = time.perf_counter() - capture_start
    if rot.site != "none":
        rotations, report.rotation = start_rotations(model, adapter, rot)
    if rot.site == "kotms":  # a pass over the full-precision layers; half of the input rows for the
        # activation term, half to judge the learned rotations (in the layer loop, before quantizing)
        walk = layers if stream is None else _loaded_layers(stream, len(layers), prepare)
        tokens = 2 * rot.kotms.activation_tokens
        samples, rows = full_precision_samples(walk, adapter, batches, tokens, device, rot.kotms)
        learned = learn_rotations(adapter, rows, samples, rotations, report.rotation, rot.kotms, progress)
    report.rotation_seconds = time.perf_counter() - start - capture_seconds
    for index in tqdm(range(len(layers)), desc="quantize layers", disable=not progress):
        layer = layers[index]
        if stream is not None:
            layer = stream.load(index)
            prepare(layer, index)
        if learned is not None:
            choose_rotations(
                layer, index, adapter, rotations, learned, samples, rot.kotms, config.activations, report.rotation
            )
        if report.rotation is not None:
            record_shaping(report.rotation, layer, index, adapter, rotations, len(layers) // 2)
        layer.to(device)
        if config.reconstruction:
            windows = split_windows(batches)
            targets = block_targets(layer, windows)
        early = (
            {}
            if config.true_sequential
            else {s.name: _site_inputs(layer, index, adapter, s, batches, config) for s in adapter.sites}
        )
        for site in adapter.sites:
            inputs = early.get(site.name) or _site_inputs(layer, index, adapter, site, batches, config)
            rotation = rotations.get((index, site.name))
            _quantize_site(layer, index, adapter, site, inputs, rotation, config, report)
        if config.reconstruction:
            result = reconstruct_block(layer, index, adapter, windows, targets, report.weights, config.reconstruction)
            report.reconstruction.append({"layer": index, **result.to_dict()})
            _refresh_clips(layer, index, adapter, report.records)
            del windows, targets
        batches = batches.advance(layer)
        layer.to("cpu")
        if stream is not None:
            stream.release(index, layer, report, keep=config.end_to_end is not None or config.allocation is not None)
    del batches
    if config.end_to_end:

        def done(index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
            _refresh_clips(layer, index, adapter, report.records)
            if stream is not None:
                (stream.store if config.allocation else stream.finish)(index, layer, weights)

        result = reconstruct_model(
            model, adapter, calibration, teacher, report.weights, config.end_to_end, device, progress, done, stream
        )
        report.end_to_end = result.to_dict()
    if config.allocation:
        report.allocation = allocate(model, adapter, calibration, config.allocation, device, progress, stream)
        for record in report.records:
            record.act_bits = report.allocation.bits[record.name]
            record.act_clip = (record.act_clips or {}).get(record.act_bits, 1.0)
        for index in range(len(layers) if stream is not None else 0):
            stream.finish(index, *stream.reload(index))
    report.seconds = time.perf_counter() - start
    return model, report
