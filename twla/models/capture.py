"""Running calibration tokens up to a decoder layer or a linear layer, and collecting what enters it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from twla.models.adapters import Adapter

if TYPE_CHECKING:
    from twla.quantization.weights import QuantizedWeight


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def layer_output(out) -> Tensor:
    """The hidden states of a decoder layer's output (a tensor or a tuple starting with one)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerInputs:
    """The calibration batches entering decoder layer ``index``: hidden states per batch, and per
    batch the keyword arguments of every decoder layer (position embeddings, attention masks;
    layers of one kind share the same objects, e.g. Gemma-3's sliding-window and global layers
    take different ones). Iterating gives (hidden states, this layer's keyword arguments)."""

    hidden: list[Tensor]
    kwargs: list[list[dict]]
    index: int = 0
    device: torch.device | None = None  # set: the hidden states wait on the host and go there batch by batch

    def __iter__(self) -> Iterator[tuple[Tensor, dict]]:
        return (
            (h if self.device is None else h.to(self.device), kw[self.index])
            for h, kw in zip(self.hidden, self.kwargs, strict=True)
        )

    def __len__(self) -> int:
        return len(self.hidden)

    @torch.no_grad()
    def advance(self, layer: nn.Module) -> LayerInputs:
        """The outputs of ``layer`` (decoder layer ``index``): the inputs of the next layer."""
        hidden = [
            layer_output(layer(h, **kw)).to(stored.device) for (h, kw), stored in zip(self, self.hidden, strict=True)
        ]
        return LayerInputs(hidden, self.kwargs, self.index + 1, self.device)


class KeptLayers(Protocol):
    """Quantized decoder layers kept out of memory (:mod:`twla.quantization.streaming`): ``reload`` gives layer
    ``index`` on the CPU with its quantized weights (by full linear name), ``unload`` drops it again."""

    def reload(self, index: int) -> tuple[nn.Module, dict[str, QuantizedWeight]]: ...

    def unload(self, index: int, layer: nn.Module) -> None: ...


class _Standin(nn.Module):
    """Stands in for decoder layer ``index``: its output is ``run(index, hidden states, keyword
    arguments)``."""

    def __init__(self, index: int, run: Callable[[int, Tensor, dict], Tensor]) -> None:
        super().__init__()
        self.index, self.run = index, run

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args:
            raise TypeError("decoder layers are expected to take their extra inputs as keyword arguments")
        return self.run(self.index, hidden_states, kwargs)


@contextmanager
def layers_replaced(model: nn.Module, adapter: Adapter, run: Callable[[int, Tensor, dict], Tensor]) -> Iterator[None]:
    """Inside, the model's decoder layers are stand-ins whose outputs come from ``run`` (the model's
    own forward does everything else: embedding, masks, rotary tables, final norm, head)."""
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Standin(i, run)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def reloading(
    load: Callable[[int], nn.Module], unload: Callable[[int, nn.Module], None], device: torch.device
) -> Callable[[int, Tensor, dict], Tensor]:
    """A stand-in for :func:`layers_replaced` that loads layer i (``load``), runs it on ``device`` and
    drops it (``unload``): a forward pass with one decoder layer in memory at a time."""

    def run(index: int, hidden: Tensor, kwargs: dict) -> Tensor:
        layer = load(index)
        try:
            return layer_output(layer.to(device)(hidden, **kwargs))
        finally:
            unload(index, layer)

    return run


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, *, batch_size: int, device: torch.device, offload: bool = False
) -> LayerInputs:
    """Inputs of decoder layer 0 per batch, and every layer's keyword arguments: the layers are
    swapped for recorders for one pass, so only the embedding and the rotary tables run.
    offload: keep the hidden states in host memory between layers (moved to ``device`` per batch)."""
    last = len(adapter.decoder_layers(model)) - 1
    hidden: list[Tensor] = []
    kwargs: list[list[dict]] = []

    def record(index: int, states: Tensor, kw: dict) -> Tensor:
        if index == 0:
            hidden.append(states.cpu() if offload else states)
            kwargs.append([])
        kwargs[-1].append(kw)
        if index == last:
            raise _Stop
        return states

    prefix = adapter.prefix_modules(model)
    for mod in prefix:
        mod.to(device)
    try:
        with layers_replaced(model, adapter, record):
            for batch in windows.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for mod in prefix:
            mod.to("cpu")
    return LayerInputs(hidden, kwargs, device=device if offload else None)


@dataclass
class SiteInputs:
    """Statistics of the calibration tokens entering a site: S = XᵀX / N (float64), N, and
    an evenly strided sample of about ``keep`` raw input rows (float32) or None."""

    S: Tensor
    tokens: int
    sample: Tensor | None


@torch.no_grad()
def collect_statistics(
    layer: nn.Module,
    linear: nn.Module,
    batches: LayerInputs | list[tuple[Tensor, dict]],
    *,
    keep: int = 0,
    statistics: bool = True,
) -> SiteInputs:
    """Accumulate S over all calibration tokens entering ``linear`` (on its device);
    ``statistics=False`` only takes the token sample (S stays zero)."""
    m = linear.in_features
    S = torch.zeros(m, m, dtype=torch.float64, device=linear.weight.device)
    stored = batches.hidden if isinstance(batches, LayerInputs) else [hidden for hidden, _ in batches]
    total = sum(hidden.shape[:-1].numel() for hidden in stored)
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
