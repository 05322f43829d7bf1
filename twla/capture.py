"""Running calibration tokens up to a decoder layer or a linear layer, and collecting what enters it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from twla.adapters import Adapter


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def layer_output(out) -> Tensor:
    """The hidden states of a decoder layer's output (a tensor or a tuple starting with one)."""
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


@dataclass
class SiteInputs:
    """Statistics of the calibration tokens entering a site: S = XᵀX / N (float64), N, and
    an evenly strided sample of about ``keep`` raw input rows (float32) or None."""

    S: Tensor
    tokens: int
    sample: Tensor | None


@torch.no_grad()
def collect_statistics(
    layer: nn.Module, linear: nn.Module, batches: list[tuple[Tensor, dict]], keep: int = 0, statistics: bool = True
) -> SiteInputs:
    """Accumulate S over all calibration tokens entering ``linear`` (on its device);
    ``statistics=False`` only takes the token sample (S stays zero)."""
    m = linear.in_features
    S = torch.zeros(m, m, dtype=torch.float64, device=linear.weight.device)
    total = sum(hidden.shape[:-1].numel() for hidden, _ in batches)
    stride = max(1, total // keep) if keep else 0
    rows: list[Tensor] = []
    count = 0

    def accumulate(module, args):
        nonlocal count
        x = args[0].reshape(-1, m).to(torch.float32)
        if statistics:
            S.add_((x.T @ x).double())
        if stride:
            rows.append(x[(-count) % stride :: stride].clone())
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
    return SiteInputs(S / max(count, 1), count, torch.cat(rows) if stride else None)
