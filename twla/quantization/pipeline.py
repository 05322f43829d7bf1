"""Layer-wise sequential post-training quantization (GPTQ's schedule), as a list of stages.

:func:`quantize` runs the stages of :data:`BEFORE_LAYERS` once, then those of
:data:`PER_LAYER` for each decoder layer in turn (only it on the compute device; with a
:class:`~twla.quantization.state.LayerStream`, only it in memory at all), the *quantized*
layer's outputs feeding the next, then those of :data:`AFTER_LAYERS`. Each stage is a
:class:`~twla.quantization.state.Stage`: a name, a function of the shared
:class:`~twla.quantization.state.QuantRun`, and the configurations it applies to; the report
lists every stage's time and summary. A new stage is one function and one line here.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.models.adapters import Adapter, get_adapter
from twla.models.capture import capture_layer_inputs
from twla.models.loading import resolve_device
from twla.quantization.allocation import allocate_bits, cost_windows
from twla.quantization.config import QuantConfig
from twla.quantization.reconstruct import (
    reconstruct_end_to_end,
    reconstruct_layer,
    record_block_targets,
    record_teacher,
)
from twla.quantization.records import QuantReport
from twla.quantization.rotation import check_residual_rotation, rotate_residual
from twla.quantization.site_rotations import choose_layer_rotations, start_site_rotations
from twla.quantization.sites import quantize_sites
from twla.quantization.state import LayerStream, QuantRun, Stage
from twla.quantization.weight_allocation import allocate_weights, check_weight_budget, format_config, weight_units


def capture_inputs(run: QuantRun) -> None:
    """Stage: the decoder layers prepared (residual rotation, wrapped linears; a streamed layer
    when it is loaded) and the calibration batch run up to the first layer."""
    if run.stream is None:
        for index, layer in enumerate(run.layers):
            run.prepare(layer, index)
    config = run.config
    windows = run.calibration[: config.layer_windows_of(run.calibration.shape[0])]
    run.batches = capture_layer_inputs(
        run.model, run.adapter, windows, batch_size=config.batch_size, device=run.device, offload=run.offload
    )


BEFORE_LAYERS = (
    Stage("teacher", record_teacher, lambda c: c.end_to_end is not None),
    Stage("residual rotation", rotate_residual, lambda c: c.rotation.residual != "none"),
    Stage("capture", capture_inputs),
    Stage("site rotations", start_site_rotations, lambda c: c.rotation.site != "none"),
    Stage("weight allocation", allocate_weights, lambda c: c.weight_allocation is not None),
)
PER_LAYER = (
    Stage("rotation choice", choose_layer_rotations, lambda c: c.rotation.site != "none"),
    Stage("block targets", record_block_targets, lambda c: c.reconstruction is not None),
    Stage("layer-wise solve", quantize_sites),
    Stage("block reconstruction", reconstruct_layer, lambda c: c.reconstruction is not None),
)
AFTER_LAYERS = (
    Stage("end-to-end reconstruction", reconstruct_end_to_end, lambda c: c.end_to_end is not None),
    Stage("bit allocation", allocate_bits, lambda c: c.allocation is not None),
)
ROTATION_STAGES = ("residual rotation", "site rotations")


def check_finite(tensor: Tensor, name: str) -> None:
    """Refuse the model tensor ``name`` if it holds NaN or inf."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values; refusing to quantize")


def check_finite_tensors(model: nn.Module) -> None:
    """Refuse a model any of whose tensors (parameters and stored buffers) holds NaN or inf."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_meta:
            check_finite(tensor, name)


def check_weight_allocation(model: nn.Module, adapter: Adapter, config: QuantConfig, calibration: Tensor) -> None:
    """Refuse a weight allocation that cannot run: too short windows, a budget below every linear's
    cheapest format."""
    cfg = config.weight_allocation
    cost_windows(calibration, cfg)
    formats = [format_config(option, config.weights) for option in cfg.options]
    check_weight_budget(weight_units(model, adapter), formats, cfg.budget)


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Tensor,
    *,
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
    if stream is not None and not config.streamable:
        raise ValueError(f"{config.whole_model}: it cannot stream layers")
    if config.weight_allocation:
        check_weight_allocation(model, adapter, config, calibration)
    config.check_windows(calibration.shape[0])
    report = QuantReport(config, calibration_tokens=calibration.numel())
    run = QuantRun(model, adapter, config, calibration, resolve_device(device), report, progress, stream, offload)
    start = time.perf_counter()
    for stage in BEFORE_LAYERS:
        stage(run)
    for index in tqdm(range(len(run.layers)), desc="quantize layers", disable=not progress):
        run.enter_layer(index)
        for stage in PER_LAYER:
            stage(run)
        run.leave_layer()
    run.batches = None
    for stage in AFTER_LAYERS:
        stage(run)
    report.rotation_seconds = sum(report.stages[name]["seconds"] for name in ROTATION_STAGES if name in report.stages)
    report.seconds = time.perf_counter() - start
    return model, report
