"""Packing a quantized model into packed ternary and integer modules and writing its packed checkpoint
(:mod:`twla.deploy.format` describes the files); converting an older format version."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from twla.deploy.cpu_layout import converted
from twla.deploy.format import (
    CONFIG_FILES,
    FORMAT,
    QUANT_FILE,
    QUANT_METHOD,
    REPORT_FILE,
    TENSOR_FILE,
    VERSION,
    PackedBits,
    _count_bits,
    check_files,
    is_packed_checkpoint,
    meta_digest,
    read_meta,
    sha256_file,
)
from twla.deploy.linears import pack_linear
from twla.deploy.packed_linear import PackedLinear
from twla.deploy.ternary_linear import TernaryLinear
from twla.io import atomic_directory, check_output_dir
from twla.kernels.packing import unpack_codes, unpack_codes_strided
from twla.kernels.trits import pack_trits
from twla.models.adapters import get_adapter
from twla.models.shards import CheckpointTensors, TensorSource, write_safetensors
from twla.quantization.fake_quant import QuantLinear

if TYPE_CHECKING:
    from twla.quantization.weights import QuantizedWeight


def pack_model(model: nn.Module, weights: Mapping[str, QuantizedWeight]) -> nn.Module:
    """Replace each quantized linear named in ``weights`` (``QuantReport.weights``) by a packed
    linear in its record's format (:mod:`twla.deploy.linears`: ternary or integer), in place;
    returns the model. Rotation factors shared by a site's linears stay shared."""
    owners: dict[int, PackedLinear] = {}  # id of a site's rotation factor → the first linear packed with it
    for name, weight in weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear | QuantLinear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a quantized linear; was it packed already?")
        packed = pack_linear(name, module, weight)
        rotation = getattr(module, "rot1", None)
        if rotation is not None:
            owner = owners.setdefault(id(rotation), packed)
            if owner is not packed:
                packed.share_rotation(owner)
        model.set_submodule(name, packed)
    return model


def _storage_tensor(key: str, t: Tensor, linears: Mapping[str, PackedLinear], dtype: torch.dtype | None) -> Tensor:
    """The tensor as stored: α, μ and integer scales in fp16 (they are fp16-rounded, checked), column
    orders in int16, the unquantized matrices (embeddings, head) in ``dtype`` (None: as they are);
    codes, vectors (norm gains, biases) and the packed linears' rotation factors as they are."""
    owner, _, leaf = key.rpartition(".")
    t = t.detach().cpu()
    if owner in linears and leaf in linears[owner].half_tensors:
        half = t.half()
        if not torch.equal(half.float(), t.float()):
            raise ValueError(f"{key}: values are not representable in 16 bits; the packed format stores them in fp16")
        return half
    if owner in linears and leaf == "perm":
        return t.to(torch.int16 if linears[owner].in_features <= torch.iinfo(torch.int16).max else torch.int32)
    if dtype is not None and t.is_floating_point() and t.ndim >= 2 and owner not in linears:
        t = t.to(dtype)
    return t.contiguous()


def packed_linears(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def linear_settings(linears: Mapping[str, PackedLinear]) -> tuple[dict, dict]:
    """Each packed linear's settings, and for each linear that shares its site's rotation factors
    the linear that stores them (both by full name, in the order given)."""
    owners = {id(m.rot1): name for name, m in linears.items() if m.rot1 is not None and not m.shares_rotation}
    sources = {}
    for name, m in linears.items():
        if m.shares_rotation:
            if id(m.rot1) not in owners:
                raise ValueError(f"{name} shares rotation factors that no packed linear stores")
            sources[name] = owners[id(m.rot1)]
    return {name: m.settings() for name, m in linears.items()}, sources


def quantization_config(
    model: nn.Module | None = None, *, method: str = "", settings: tuple[dict, dict] | None = None
) -> dict:
    """The ``quantization_config`` of a packed model's ``config.json``: everything
    ``from_pretrained`` needs to build its packed modules (each linear's settings, and which
    linear of a site holds the rotation factors the others share), from the model's packed
    linears or from ``settings`` (:func:`linear_settings`)."""
    linears, sources = settings if settings is not None else linear_settings(packed_linears(model))
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "version": VERSION,
        "method": method,
        "linears": linears,
        "rotation_sources": sources,
    }


def stored_tensors(
    items: Iterable[tuple[str, Tensor]],
    linears: Mapping[str, PackedLinear],
    tied: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The tensors ``items`` (state-dict entries) as stored (:func:`_storage_tensor`), each once: a
    tensor that shares storage with an earlier one is left out when ``tied`` ties them (target →
    source, as the model ties them on loading), and refused otherwise."""
    tensors: dict[str, Tensor] = {}
    first: dict[tuple, str] = {}
    for key, t in items:
        signature = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and signature in first:
            earlier = first[signature]
            if tied.get(key) != earlier and tied.get(earlier) != key:
                raise ValueError(f"{key} shares its storage with {earlier}, but the model does not tie them")
            continue
        first[signature] = key
        tensors[key] = _storage_tensor(key, t, linears, dtype)
    return tensors


def packed_state_dict(model: PreTrainedModel, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors of a packed model as stored, each once (:func:`stored_tensors`; the tied embedding once)."""
    if converted(model):
        raise ValueError(
            "this model was converted to the CPU kernel's layout when it was loaded and cannot be saved; "
            "load the checkpoint with the torch kernel backend (TWLA_KERNELS=torch) to save it again"
        )
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return stored_tensors(model.state_dict().items(), packed_linears(model), tied, dtype=dtype)


def save_packed(
    model: PreTrainedModel,
    tokenizer,
    path: str,
    *,
    method: str = "",
    config: Mapping | None = None,
    provenance: Mapping | None = None,
    report: Mapping | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    source: str = "",
) -> PackedBits:
    """Write the packed checkpoint of ``model`` (after :func:`pack_model`) to ``path``, atomically.

    ``method``, ``config`` (:meth:`twla.QuantConfig.to_dict`; :func:`read_config` rebuilds it)
    and ``provenance`` (what it was calibrated on, :func:`twla.data.text.provenance`) are recorded
    in ``twla_quant.json``;
    ``report`` (run metadata, e.g. timings) in ``twla_report.json``. An existing checkpoint at
    ``path`` is replaced only with ``overwrite``; anything else there is never touched.
    ``dtype`` (e.g. ``torch.bfloat16``) stores the unquantized matrices (embeddings, head) in that
    type; None keeps them as they are, so the loaded model is bit-identical. Norm gains, biases
    and rotation factors are always kept. ``source`` names the full-precision model it was quantized from
    (:func:`twla.models.loading.model_reference`; ``twla generate --compare`` loads it). Returns the
    sizes counted from the file.
    """
    check_output_dir(path, "packed checkpoint", is_packed_checkpoint, overwrite=overwrite)
    linears = packed_linears(model)
    if not linears:
        raise ValueError("the model has no packed linears; call pack_model(model, report.weights) first")
    unpacked = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if unpacked:
        raise ValueError(f"{len(unpacked)} quantized linears are not packed (e.g. {unpacked[0]}); call pack_model")
    # a packed model must not mix with dense decoder linears: every site linear is packed
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for site_linear in adapter.linear_names():
            if not isinstance(layer.get_submodule(site_linear), PackedLinear):
                raise ValueError(f"{adapter.layers}.{index}.{site_linear} is not packed; pack every layer")
    with atomic_directory(path) as tmp:
        return write_packed(
            tmp,
            model.config,
            getattr(model, "generation_config", None),
            tokenizer=tokenizer,
            tensors={key: TensorSource.of(t) for key, t in packed_state_dict(model, dtype).items()},
            settings=quantization_config(model, method=method),
            embeddings=sorted({f"{adapter.embed}.weight", f"{adapter.head}.weight"}),
            config=config,
            provenance=provenance,
            report=report,
            source=source,
        )


def write_packed(
    directory: str,
    model_config: PretrainedConfig,
    generation_config: GenerationConfig | None,
    *,
    tokenizer,
    tensors: Mapping[str, TensorSource],
    settings: Mapping,
    embeddings: list[str],
    config: Mapping | None = None,
    provenance: Mapping | None = None,
    report: Mapping | None = None,
    source: str = "",
) -> PackedBits:
    """Write the files of a packed checkpoint into ``directory`` (the staging directory of an
    atomic write): ``config.json`` with ``settings`` (:func:`quantization_config`), the generation
    config, the tokenizer, ``model.safetensors`` from ``tensors`` (read one at a time) and
    ``twla_quant.json`` with the digests; ``embeddings`` names the embedding and head tensors."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": settings["method"],
        "model_type": model_config.model_type,
        "model": source,
        "config": dict(config or {}),
        "linears": settings["linears"],
        "embeddings": embeddings,
        "provenance": dict(provenance or {}),
    }
    saved_config = copy.deepcopy(model_config)
    saved_config.quantization_config = dict(settings)
    saved_config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_safetensors(os.path.join(directory, TENSOR_FILE), tensors, metadata={"format": "pt"})
    meta["files"] = {
        name: sha256_file(os.path.join(directory, name))
        for name in (TENSOR_FILE, *CONFIG_FILES)
        if os.path.isfile(os.path.join(directory, name))
    }
    bits = _count_bits(directory, meta)
    meta["bits"] = asdict(bits)
    meta["digest"] = meta_digest(meta)
    with open(os.path.join(directory, QUANT_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, default=str)
    if report is not None:
        with open(os.path.join(directory, REPORT_FILE), "w", encoding="utf-8") as fh:
            json.dump(dict(report), fh, indent=2, default=str)
    return bits


def upgrade_packed(source: str, path: str, *, overwrite: bool = False) -> PackedBits:
    """Convert the packed checkpoint ``source`` of an older format version (:data:`UPGRADABLE`)
    to this version at ``path`` (atomically; ``source`` is only read). Versions 3 to 5 stored
    ternary codes in 2 bits (version 3 at stride 4, k = 4r + j in bits 2j..2j+1 of row r;
    versions 4 and 5 in grouped bit planes, :mod:`twla.kernels.packing`); they are rewritten in
    base 3 (:mod:`twla.kernels.trits`). Every code, grid and other tensor is the same, so the
    model computes the same outputs."""
    meta = read_meta(source, upgradable=True)
    if meta["version"] == VERSION:
        raise ValueError(f"{source!r} is already format version {VERSION}")
    check_files(source, meta)
    check_output_dir(path, "packed checkpoint", is_packed_checkpoint, overwrite=overwrite, protect=[source])
    model_config = AutoConfig.from_pretrained(source)
    settings = {**model_config.quantization_config, "version": VERSION}
    tensors = CheckpointTensors(source)
    sources = {key: tensors.source(key) for key in tensors.keys()}
    for name, linear in meta["linears"].items():
        if linear.get("kind", TernaryLinear.kind) != TernaryLinear.kind:
            continue
        planes, K = tensors.get(f"{name}.weight"), linear["in_features"]
        codes = (
            unpack_codes_strided(planes, K) if meta["version"] == 3 else unpack_codes(planes, K, linear["group_size"])
        )
        sources[f"{name}.weight"] = TensorSource.of(pack_trits(codes))
    rewritten = {TENSOR_FILE, "config.json", QUANT_FILE}
    with atomic_directory(path) as tmp:
        for name in sorted(set(os.listdir(source)) - rewritten):  # tokenizer, generation config, run report
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        return write_packed(
            tmp,
            model_config,
            None,
            tokenizer=None,
            tensors=sources,
            settings=settings,
            embeddings=meta["embeddings"],
            config=meta["config"],
            provenance=meta["provenance"],
            source=meta["model"],
        )
