"""What the stages of the pipeline share while one model is quantized: :class:`QuantRun`, the
:class:`Stage` that names each step, and the :class:`LayerStream` a model whose layers are not
all in memory comes from."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from twla.models.adapters import Adapter
from twla.models.capture import KeptLayers, LayerInputs
from twla.models.memory import resident_memory, return_freed_memory
from twla.quantization.config import QuantConfig
from twla.quantization.distillation import TeacherWindow
from twla.quantization.fake_quant import wrap_layer
from twla.quantization.records import QuantReport
from twla.quantization.rotation import Factors, rotate_residual_layer
from twla.quantization.sections import WeightConfig
from twla.quantization.weights import QuantizedWeight


class LayerStream(KeptLayers, Protocol):
    """Where the pipeline gets each decoder layer from and where it puts it when done, for a
    model whose layers are not all in memory (:mod:`twla.quantization.streaming`): ``load`` gives
    layer ``index`` with its full-precision weights on the CPU, ``unload`` drops it again,
    ``release`` takes it once quantized, for good (packed) or, with ``keep``, kept while a
    whole-model stage (end-to-end reconstruction, bit allocation) still changes it: ``reload``
    brings a kept layer back, ``store`` keeps it again and ``finish`` takes it for good."""

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module, report: QuantReport, keep: bool) -> None: ...

    def store(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None: ...

    def finish(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None: ...


@dataclass
class QuantRun:
    """One quantization run: its inputs, what the stages have made so far, and the decoder layer
    being quantized (``index``, ``layer``, fed ``batches``, the calibration inputs it receives)."""

    model: nn.Module
    adapter: Adapter
    config: QuantConfig
    calibration: Tensor  # token ids (nsamples, seqlen)
    device: torch.device
    report: QuantReport
    progress: bool = True
    stream: LayerStream | None = None
    offload: bool = False  # calibration activations wait in host memory between layers
    teacher: list[TeacherWindow] | None = None  # the full-precision next-token log-probabilities (e2e)
    residual: Factors | None = None  # the residual rotation's factors
    rotations: dict[tuple[int, str], Factors] = field(default_factory=dict)  # site rotations
    learned: dict[tuple[int, str], Factors] | None = None  # KOTMS rotations still to be judged
    samples: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # full-precision input rows
    formats: dict[str, WeightConfig] = field(default_factory=dict)  # a weight allocation's format per linear
    batches: LayerInputs | None = None
    index: int = -1
    layer: nn.Module | None = None
    block: dict = field(default_factory=dict)  # what one layer's stages hand on (reconstruction targets)

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.decoder_layers(self.model)

    @property
    def wrapped(self) -> bool:
        """Whether the linears become quantized modules (rotated or quantized inputs)."""
        return self.config.rotation.online or self.config.activations.quantized or self.config.allocation is not None

    def weights_for(self, name: str) -> WeightConfig:
        """The weight quantizer of the linear ``name``: its allocated format, or the method's."""
        return self.formats.get(name, self.config.weights)

    @property
    def keeps_layers(self) -> bool:
        """Whether whole-model stages change the layers after the layer-wise pass."""
        return self.config.end_to_end is not None or self.config.allocation is not None

    def prepare(self, layer: nn.Module, index: int) -> None:
        """Make a full-precision layer what the stages expect: residual-rotated, linears wrapped."""
        if self.residual is not None:
            rotate_residual_layer(layer, index, self.adapter, *self.residual)
        if self.wrapped:
            wrap_layer(layer, index, self.adapter)

    def full_precision_layers(self) -> Iterator[nn.Module]:
        """The prepared full-precision decoder layers in turn (from the stream, each dropped again
        when the next is asked for)."""
        if self.stream is None:
            yield from self.layers
            return
        for index in range(len(self.layers)):
            layer = self.stream.load(index)
            self.prepare(layer, index)
            yield layer
            self.stream.unload(index, layer)

    def enter_layer(self, index: int) -> None:
        self.index = index
        self.layer = self.layers[index]
        if self.stream is not None:
            self.layer = self.stream.load(index)
            self.prepare(self.layer, index)

    def leave_layer(self) -> None:
        """The quantized layer's outputs become the next layer's inputs; the layer goes back to the
        CPU (or to the stream)."""
        self.batches = self.batches.advance(self.layer)
        self.layer.to("cpu")
        if self.stream is not None:
            self.stream.release(self.index, self.layer, self.report, keep=self.keeps_layers)
        self.block = {}


def always(config: QuantConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """A named step of the pipeline: ``step(run)`` wherever ``applies(config)``. It may return a
    summary, which the report keeps beside the stage's time and the process's memory after it
    (resident and peak so far, MiB: the stage that raises the peak is the one that sets it). The
    heap's free pages go back to the system after every stage: a stage's many small temporaries
    would otherwise stay resident beside the next stage's large ones."""

    name: str
    step: Callable[[QuantRun], dict | None]
    applies: Callable[[QuantConfig], bool] = always

    def __call__(self, run: QuantRun) -> None:
        if not self.applies(run.config):
            return
        start = time.perf_counter()
        summary = self.step(run)
        entry = run.report.stages.setdefault(self.name, {"seconds": 0.0, "calls": 0})
        entry["seconds"] += time.perf_counter() - start
        entry["calls"] += 1
        return_freed_memory()
        entry.update(resident_memory())
        if summary:
            entry.update(summary)
