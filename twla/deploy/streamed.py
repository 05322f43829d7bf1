"""Evaluating a packed checkpoint whose layers do not fit in memory: the decoder layers stay on
the meta device and each is read from the tensor file whenever the model runs it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from twla.deploy.format import TENSOR_FILE, read_meta
from twla.deploy.load import finish_packed_model, prepare_packed_model
from twla.models.adapters import get_adapter
from twla.models.capture import layer_output, layers_replaced
from twla.models.loading import resolve_device
from twla.models.memory import assign, layer_prefix, parameters_on_meta, to_meta
from twla.models.shards import CheckpointTensors


class PackedLayers:
    """The decoder layers of a packed checkpoint's model, read from its tensor file one at a time."""

    def __init__(self, model: PreTrainedModel, tensors: CheckpointTensors, settings: Mapping) -> None:
        self.model, self.tensors, self.settings = model, tensors, settings
        self.adapter = get_adapter(model)
        self.layers = list(self.adapter.decoder_layers(model))

    def load(self, index: int) -> nn.Module:
        """Layer ``index`` with its stored tensors, each in the type the model holds it in."""
        layer, prefix = self.layers[index], layer_prefix(self.adapter, index)
        for key, t in layer.state_dict().items():
            if prefix + key in self.tensors:
                assign(layer, key, self.tensors.get(prefix + key).to(t.dtype))
        finish_packed_model(layer, self.settings, prefix=prefix)
        return layer

    def unload(self, layer: nn.Module) -> None:
        to_meta(layer, buffers=True)

    def run(self, device: torch.device) -> Callable[[int, Tensor, dict], Tensor]:
        def layer_on_device(index: int, hidden: Tensor, kwargs: dict) -> Tensor:
            layer = self.load(index).to(device)
            try:
                return layer_output(layer(hidden, **kwargs))
            finally:
                self.unload(layer)

        return layer_on_device


@contextmanager
def streamed_packed(
    path: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[PreTrainedModel, object, dict]]:
    """:func:`twla.deploy.load.load_packed` for a packed model that does not fit in memory: inside,
    ``(model, tokenizer, meta)`` with the decoder layers read from the tensor file one at a time
    whenever the model runs (the same outputs; the checks of loading run first). For evaluation:
    generating reads every layer for every token."""
    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    settings = dict(config.quantization_config)
    prepare_packed_model(model, settings, [os.path.join(path, TENSOR_FILE)])
    tensors = CheckpointTensors(path)
    adapter = get_adapter(model)
    layers = PackedLayers(model, tensors, settings)
    for key, t in model.state_dict().items():
        if not key.startswith(adapter.layers + ".") and key in tensors:
            assign(model, key, tensors.get(key).to(t.dtype))
    model.tie_weights()
    has_tokenizer = any(f.startswith(("tokenizer", "vocab", "merges")) for f in os.listdir(path))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    with layers_replaced(model, adapter, layers.run(resolve_device(device))):
        yield model, tokenizer, meta
