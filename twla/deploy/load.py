"""Loading a packed checkpoint: the model built with empty packed modules, its tensors read,
rotation factors shared and the kernels' buffers derived."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from twla.deploy.format import FORMAT, QUANT_FILE, READABLE, CheckpointError, check_files, read_meta, refuse_version
from twla.deploy.linears import linear_from_settings
from twla.deploy.save import packed_linears
from twla.deploy.ternary_linear import TernaryLinear


def prepare_packed_model(model: PreTrainedModel, settings: Mapping, files: list[str]) -> None:
    """Before ``from_pretrained`` reads the tensors of a packed checkpoint: check its files
    (against their digests when ``twla_quant.json`` is there, and the tensor names and shapes
    against the model), and put empty packed modules (:mod:`twla.deploy.linears`) in place of the
    packed linears, on the device the model is being built on (no dense weights are allocated)."""
    path = os.path.dirname(files[0])
    if settings.get("format") != FORMAT:
        raise CheckpointError(f"{path}: packed format {settings.get('format')!r} is not supported ({FORMAT!r} is)")
    if settings.get("version") not in READABLE:
        refuse_version(f"{path} (config.json)", settings.get("version"), path)
    if os.path.isfile(os.path.join(path, QUANT_FILE)):
        meta = read_meta(path)
        check_files(path, meta)
        if meta["model_type"] != model.config.model_type:
            raise CheckpointError(
                f"{path}: config.json describes a {model.config.model_type!r} model but the packed weights are for "
                f"{meta['model_type']!r}"
            )
        if meta["linears"] != settings.get("linears"):
            raise CheckpointError(f"{path}: the packed linears of config.json and {QUANT_FILE} disagree")
    for name, spec in settings["linears"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(
                f"{path}: packed linear {name} does not exist in the {model.config.model_type} model"
            ) from err
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (
            spec["in_features"],
            spec["out_features"],
        ):
            raise CheckpointError(
                f"{path}: packed linear {name} is {spec['out_features']}×{spec['in_features']} but the model's "
                f"config gives {getattr(old, 'out_features', '?')}×{getattr(old, 'in_features', '?')}"
            )
        try:
            with torch.device(old.weight.device):
                module = linear_from_settings(spec)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: invalid settings for {name}: {err!r}") from err
        model.set_submodule(name, module)
    _check_tensor_names(model, files)


def _check_tensor_names(model: PreTrainedModel, files: list[str]) -> None:
    """Every tensor the packed model stores is in ``files`` with its shape, and nothing else."""
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as fh:
                shapes.update({key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()})
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is corrupt: {err}") from err
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    missing = sorted(set(expected) - set(shapes) - set(tied))
    unexpected = sorted(set(shapes) - set(expected))
    path = os.path.dirname(files[0])
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its model: missing {missing[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}"
        )
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise CheckpointError(f"{path}: {key} has shape {shape} in the file but {expected[key]} in the model")


def finish_packed_model(model: nn.Module, settings: Mapping, *, prefix: str = "") -> None:
    """After ``from_pretrained`` has read the tensors: share each site's rotation factors and
    compute the buffers derived from the stored ones (of the linears under ``prefix`` when
    ``model`` is the module there, e.g. one decoder layer)."""
    for name, source in settings.get("rotation_sources", {}).items():
        if name.startswith(prefix):
            model.get_submodule(name.removeprefix(prefix)).share_rotation(
                model.get_submodule(source.removeprefix(prefix))
            )
    for module in packed_linears(model).values():
        if isinstance(module, TernaryLinear) and not module.has_offset:  # μ = 0 is not stored
            module.mu = torch.zeros_like(module.alpha)
        module.refresh()


def load_packed(
    path: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, object, dict]:
    """Rebuild ``(model, tokenizer, meta)`` from a packed checkpoint, through
    ``AutoModelForCausalLM.from_pretrained`` (which ``import twla`` teaches the packed format);
    ``dtype`` is that of the unquantized parameters and activations (α, μ and codes keep
    their own). On the CPU (``device`` None or ``cpu``) with the ``auto`` kernel backend, the
    ternary linears, embedding and head are converted to the CPU kernel's layout
    (:mod:`twla.deploy.cpu_layout`). ``meta`` is the checkpoint's ``twla_quant.json``."""
    meta = read_meta(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None if device is None else str(device))
    has_tokenizer = any(f.startswith(("tokenizer", "vocab", "merges")) for f in os.listdir(path))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer, meta
