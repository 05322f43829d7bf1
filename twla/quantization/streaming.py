"""Quantizing a checkpoint layer by layer, with only one decoder layer's weights in memory.

The model is built from its config with every parameter on the meta device; the embedding,
final norm and head are read once. :func:`twla.quantization.pipeline.quantize` then asks for each decoder
layer in turn: its tensors are read from the checkpoint's memory-mapped safetensors files,
it is quantized with the usual schedule, packed, written to a scratch file inside the output's
staging directory, and dropped back to the meta device. At the end the packed tensors are
copied one at a time into ``model.safetensors``. Peak host memory is one layer, the
embeddings and the calibration activations, whatever the depth; the output is the same
checkpoint, byte for byte, as quantizing the whole model in memory and saving it.

Evaluation reads a packed checkpoint the same way (:func:`streamed_packed`): the decoder
layers stay on the meta device and each is read from the tensor file whenever the model runs
it, for models whose packed weights do not fit either.

The whole-model stages stream too. With end-to-end reconstruction the stream runs the
full-precision teacher pass (each layer read and dropped in turn), keeps every quantized
layer's codes and parameters in the scratch folder, and reloads them one at a time for each
forward and backward pass of the tuning (:func:`twla.quantization.reconstruct.reconstruct_model`); bit
allocation reloads them for each cost pass (:func:`twla.quantization.allocation.allocate`); learned
rotations take a first pass over the full-precision layers. The kept layers are packed at the
end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from twla.deploy.format import PackedBits, is_packed_checkpoint
from twla.deploy.save import (
    linear_settings,
    pack_model,
    packed_linears,
    quantization_config,
    stored_tensors,
    write_packed,
)
from twla.io import atomic_directory, check_output_dir
from twla.models.adapters import Adapter, get_adapter
from twla.models.loading import ModelSource, model_source
from twla.models.memory import assign, layer_prefix, parameters_on_meta, to_meta
from twla.models.shards import CheckpointTensors, TensorSource, write_safetensors
from twla.quantization.config import QuantConfig
from twla.quantization.pipeline import check_finite, quantize
from twla.quantization.records import QuantReport
from twla.quantization.weights import QuantizedWeight

SCRATCH = ".twla-layers"  # packed layers inside the staging directory, removed before it is published


def _check_tensors(model: PreTrainedModel, adapter: Adapter, tensors: CheckpointTensors) -> None:
    """Every tensor the model needs is in the checkpoint with its shape (a tied head may be
    missing), and every one is finite: checked before any work, one tensor at a time."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in tensors and k not in tied)
    if missing:
        raise ValueError(
            f"{tensors.path!r} lacks {len(missing)} tensors of the {model.config.model_type} model (e.g. "
            f"{missing[0]}): its tensor names differ from the model's; quantize it in memory instead (--in-memory)"
        )
    for key, t in expected.items():
        if key in tensors and tensors.shape(key) != tuple(t.shape):
            raise ValueError(
                f"{tensors.path!r}: {key} has shape {tensors.shape(key)}, the config gives {tuple(t.shape)}"
            )
    for key in expected:
        if key in tensors:
            check_finite(tensors.get(key), key)


def empty_model(
    source: ModelSource, tensors: CheckpointTensors, *, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """The model of ``source`` with its decoder layers on the meta device and everything else
    (embedding, final norm, head, rotary tables) read from ``tensors`` in ``dtype``."""
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
    model.eval()
    adapter = get_adapter(model)
    _check_tensors(model, adapter, tensors)
    layers = adapter.layers + "."
    for key, t in model.state_dict().items():
        if not key.startswith(layers) and key in tensors:
            assign(model, key, tensors.get(key, dtype if t.is_floating_point() else None))
    model.tie_weights()
    meta = [k for k, t in model.state_dict().items() if not k.startswith(layers) and t.is_meta]
    if meta:
        raise ValueError(f"{tensors.path!r}: no tensor for {', '.join(meta)}")
    generation = os.path.join(source.path, "generation_config.json")
    if os.path.isfile(generation):
        model.generation_config = GenerationConfig.from_pretrained(source.path)
    return model


class StreamedLayers:
    """The :class:`twla.quantization.pipeline.LayerStream` of a checkpoint: loads each decoder layer from its
    tensors, and when it is quantized, packs it, writes its stored tensors to ``scratch`` and
    frees it (or, while end-to-end reconstruction is ahead, writes its parameters and quantized
    weights to ``scratch`` for :meth:`reload`). ``settings`` and ``files`` accumulate what the
    packed checkpoint needs."""

    def __init__(
        self, model: PreTrainedModel, tensors: CheckpointTensors, scratch: str, dtype: torch.dtype | None
    ) -> None:
        self.model, self.tensors, self.scratch, self.dtype = model, tensors, scratch, dtype
        self.adapter = get_adapter(model)
        self.layers = list(self.adapter.decoder_layers(model))  # the model's may be stand-ins for a while
        self.linears: dict[str, dict] = {}
        self.sources: dict[str, str] = {}
        self.files: list[str] = []
        os.makedirs(scratch, exist_ok=True)

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        prefix = layer_prefix(self.adapter, index)
        state = {}
        for key, t in layer.state_dict().items():
            state[key] = self.tensors.get(prefix + key, torch.float32 if t.is_floating_point() else None)
        layer.load_state_dict(state, assign=True)
        return layer

    def unload(self, index: int, layer: nn.Module) -> None:
        """Put the layer's parameters back on the meta device (its buffers, small rotation factors,
        stay)."""
        to_meta(layer)

    def _kept(self, index: int) -> str:
        return os.path.join(self.scratch, f"kept-{index:05d}.pt")

    def release(self, index: int, layer: nn.Module, report: QuantReport, keep: bool = False) -> None:
        prefix = layer_prefix(self.adapter, index)
        weights = {name: report.weights.pop(name) for name in list(report.weights) if name.startswith(prefix)}
        (self.store if keep else self.finish)(index, layer, weights)

    def store(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        """Write the quantized layer's parameters and weights to ``scratch`` for :meth:`reload`, and
        free it."""
        linears = {f"{path}.weight" for path in self.adapter.linear_names()}  # rebuilt from the codes
        params = {key: p.detach() for key, p in layer.named_parameters() if key not in linears}
        torch.save({"params": params, "weights": weights}, self._kept(index))
        self.unload(index, layer)

    def reload(self, index: int) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
        """Layer ``index`` as :meth:`release` kept it (parameters frozen), and its quantized weights."""
        kept = torch.load(self._kept(index), weights_only=False)  # written by release in this run
        layer = self.layers[index]
        prefix = layer_prefix(self.adapter, index)
        for key, t in kept["params"].items():
            assign(layer, key, t)
        for path in self.adapter.linear_names():
            assign(layer, f"{path}.weight", kept["weights"][prefix + path].dequantize(torch.float32))
        layer.requires_grad_(False)
        return layer, kept["weights"]

    def finish(self, index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        """Pack the quantized layer, write its stored tensors to ``scratch`` and free it."""
        prefix = layer_prefix(self.adapter, index)
        pack_model(self.model, weights)
        linears = {prefix + name: m for name, m in packed_linears(layer).items()}
        settings, sources = linear_settings(linears)
        self.linears.update(settings)
        self.sources.update(sources)
        stored = stored_tensors(layer.state_dict(prefix=prefix).items(), linears, {}, dtype=self.dtype)
        file = os.path.join(self.scratch, f"layer-{index:05d}.safetensors")
        write_safetensors(file, {key: TensorSource.of(t) for key, t in stored.items()}, {})
        self.files.append(file)
        if os.path.exists(self._kept(index)):
            os.remove(self._kept(index))
        to_meta(layer, buffers=True)

    def packed_tensors(self) -> Mapping[str, TensorSource]:
        """Every stored tensor of the packed model: the ends from memory, the layers from ``scratch``."""
        layers = self.adapter.layers + "."
        tied = self.model.get_expanded_tied_weights_keys(all_submodels=True)
        ends = ((k, t) for k, t in self.model.state_dict().items() if not k.startswith(layers))
        sources = {key: TensorSource.of(t) for key, t in stored_tensors(ends, {}, tied, dtype=self.dtype).items()}
        scratch = CheckpointTensors.of_files(self.files)
        sources.update({key: scratch.source(key) for key in scratch.keys()})
        return sources


def quantize_checkpoint(
    source: str | ModelSource,
    config: QuantConfig,
    calibration: Tensor,
    *,
    path: str,
    method: str = "",
    device: str | torch.device | None = None,
    progress: bool = True,
    provenance: Mapping | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    reference: str = "",
    offload: bool = False,
) -> tuple[QuantReport, PackedBits]:
    """Quantize the checkpoint directory ``source`` with ``config`` layer by layer and write its
    packed checkpoint to ``path`` (atomically: an interrupted run leaves ``path`` as it was).

    The arguments are those of :func:`twla.quantization.pipeline.quantize` and :func:`twla.deploy.save.save_packed`
    (``reference`` is save_packed's ``source``); the checkpoint is the one that quantizing the whole
    model in memory and saving it would give, for every method: the whole-model stages (end-to-end
    reconstruction, bit allocation) and the learned rotations reload the layers one at a time for
    each of their passes."""
    source = source if isinstance(source, ModelSource) else model_source(source)
    if not source.local:
        raise ValueError(
            f"{source.path!r} is not a local checkpoint directory; layer-by-layer loading reads local files"
        )
    check_output_dir(path, "packed checkpoint", is_packed_checkpoint, overwrite=overwrite, protect=[source.path])
    tensors = CheckpointTensors(source.path)
    model = empty_model(source, tensors)
    adapter = get_adapter(model)
    with atomic_directory(path) as tmp:
        stream = StreamedLayers(model, tensors, os.path.join(tmp, SCRATCH), dtype)
        model, report = quantize(
            model, config, calibration, device=device, progress=progress, stream=stream, offload=offload
        )
        bits = write_packed(
            tmp,
            model.config,
            model.generation_config,
            tokenizer=source.tokenizer,
            tensors=stream.packed_tensors(),
            settings=quantization_config(method=method, settings=(stream.linears, stream.sources)),
            embeddings=sorted({f"{adapter.embed}.weight", f"{adapter.head}.weight"}),
            config=config.to_dict(),
            provenance=provenance,
            report=report.to_dict(),
            source=reference,
        )
        shutil.rmtree(stream.scratch)
    return report, bits
