"""Layer-wise sequential post-training quantization (GPTQ's schedule, DESIGN §3.5).

The calibration batch runs through the model one decoder layer at a time. For each
input site of the layer, the statistics S = XᵀX / N of its input are collected, its
linear layers are ternarized against S, and the *quantized* layer's outputs feed the
next layer. Only the current decoder layer sits on the compute device.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.adapters import Adapter, Site, get_adapter
from twla.config import QuantConfig
from twla.weights import TernaryWeight, quantize_weight


@dataclass
class LayerRecord:
    """Diagnostics of one quantized linear layer.

    weight_error = ‖W − Ŵ‖²/‖W‖², output_error = tr(E S Eᵀ)/tr(W S Wᵀ) on the calibration
    inputs; stages hold the same two ratios after each stage of the block fit (summed
    over blocks in each block's metric, relative to tr(W H Wᵀ), H the damped S).
    """

    name: str
    layer: int
    site: str
    shape: tuple[int, int]
    weight_error: float
    output_error: float
    stages: dict[str, dict[str, float]]
    seconds: float


@dataclass
class QuantReport:
    """What :func:`quantize` did: per-layer records, the ternary weights, and timing."""

    config: QuantConfig
    records: list[LayerRecord] = field(default_factory=list)
    weights: dict[str, TernaryWeight] = field(default_factory=dict)
    seconds: float = 0.0
    calibration_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "layers": [asdict(r) for r in self.records],
        }


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def check_finite_weights(model: nn.Module, adapter: Adapter) -> None:
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for path in adapter.linear_names():
            if not torch.isfinite(layer.get_submodule(path).weight).all():
                raise ValueError(f"layer {i} {path}: weight contains NaN or inf values; refusing to quantize")


def _layer_output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int, device: torch.device
) -> list[tuple[Tensor, dict]]:
    """Inputs (hidden states and keyword arguments) of decoder layer 0, per batch."""
    layers = adapter.decoder_layers(model)
    captured: list[tuple[Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    prefix = adapter.prefix_modules(model)
    for mod in prefix:
        mod.to(device)
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for mod in prefix:
            mod.to("cpu")
    return captured


@torch.no_grad()
def collect_statistics(layer: nn.Module, linear: nn.Linear, batches: list[tuple[Tensor, dict]]) -> tuple[Tensor, int]:
    """S = XᵀX / N over all calibration tokens entering ``linear`` (float64, on its device), and N."""
    m = linear.in_features
    S = torch.zeros(m, m, dtype=torch.float64, device=linear.weight.device)
    count = 0

    def accumulate(module, args):
        nonlocal count
        x = args[0].reshape(-1, m).to(torch.float32)
        S.add_((x.T @ x).double())
        count += x.shape[0]
        raise _Stop

    handle = linear.register_forward_pre_hook(accumulate)
    try:
        for hidden, kwargs in batches:
            try:
                layer(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return S / max(count, 1), count


def _quantize_site(
    layer: nn.Module, index: int, adapter: Adapter, site: Site, S: Tensor, config: QuantConfig, report: QuantReport
) -> None:
    for path, linear in adapter.site_linears(layer, site).items():
        start = time.perf_counter()
        W = linear.weight.detach().to(S.device, torch.float64)
        tw, res = quantize_weight(W, S, config.weights)
        W_hat = tw.dequantize(torch.float64).to(S.device)
        E = W - W_hat
        energy_s = float(((W @ S) * W).sum())
        energy_h = energy_s + config.weights.damp * float(torch.diagonal(S).mean()) * float((W**2).sum())
        wnorm = float((W**2).sum())
        stages = {
            name: {
                "weight_error": res.stage_weight_error[name] / wnorm,
                "output_error": res.stage_output_error[name] / energy_h,
            }
            for name in res.stage_weight_error
        }
        linear.weight.data.copy_(W_hat.to(linear.weight.dtype))
        name = f"{adapter.layers}.{index}.{path}"
        report.weights[name] = tw
        report.records.append(
            LayerRecord(
                name=name,
                layer=index,
                site=site.name,
                shape=tw.shape,
                weight_error=float((E**2).sum()) / wnorm,
                output_error=float(((E @ S) * E).sum()) / max(energy_s, 1e-300),
                stages=stages,
                seconds=time.perf_counter() - start,
            )
        )


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    calibration: Tensor,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[nn.Module, QuantReport]:
    """Ternarize every linear layer of the decoder blocks in place (fake-quantized weights).

    calibration: token ids, shape (nsamples, seqlen). Returns the model and a report.
    """
    adapter = get_adapter(model)
    check_finite_weights(model, adapter)
    if calibration.ndim != 2 or calibration.numel() == 0:
        raise ValueError("calibration must be a non-empty (nsamples, seqlen) tensor of token ids")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = QuantReport(config, calibration_tokens=calibration.numel())
    start = time.perf_counter()
    batches = capture_layer_inputs(model, adapter, calibration, config.batch_size, device)
    layers = adapter.decoder_layers(model)
    for index, layer in enumerate(tqdm(layers, desc=f"quantize {config.weights.quantizer}", disable=not progress)):
        layer.to(device)
        if config.true_sequential:
            for site in adapter.sites:
                first = adapter.site_linears(layer, site)[site.linears[0]]
                S, _ = collect_statistics(layer, first, batches)
                _quantize_site(layer, index, adapter, site, S, config, report)
        else:
            stats = [
                collect_statistics(layer, adapter.site_linears(layer, site)[site.linears[0]], batches)[0]
                for site in adapter.sites
            ]
            for site, S in zip(adapter.sites, stats):
                _quantize_site(layer, index, adapter, site, S, config, report)
        batches = [(_layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]
        layer.to("cpu")
    report.seconds = time.perf_counter() - start
    return model, report
