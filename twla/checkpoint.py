"""Packed ternary checkpoints: save a quantized model in 2 bits per weight and load it back.

A checkpoint is a directory written atomically, in the layout of a transformers checkpoint:

- ``config.json`` (and ``generation_config.json``): the model's own config, with a
  ``quantization_config`` (:func:`quantization_config`: quant_method ``twla``, format and
  version, the method, each packed linear's shape, group size, activation settings and
  whether it shares its site's rotation factors);
- the tokenizer's files;
- ``model.safetensors``: every tensor once (the tied embedding once). Each
  :class:`~twla.ternary_linear.TernaryLinear` stores ``weight`` (uint8 codes c = t + 1, four
  per byte along the input in the grouped plane layout of :mod:`twla.kernels.packing`, shape
  (⌈K/4⌉, N)), ``alpha`` and ``mu`` (fp16, per (group,
  row)), ``perm`` (int16 column order, when the blocks were reordered), ``rot1``/``rot2``
  (the online rotation factors, on the first linear of a site) and its bias; the
  unquantized parameters keep their names. A loader that does not know the format meets a
  ``weight`` whose shape no dense linear has, and refuses (stock transformers without
  ``import twla``), instead of running random weights;
- ``twla_quant.json``: format and version, the method and its config, each packed
  linear's settings, the calibration's provenance, the bits counted from the tensor file,
  the SHA-256 of every file that determines the model's outputs, and a digest of its own
  content;
- ``twla_report.json`` (optional): run metadata such as timings, outside the digests, so that
  the same seed gives a byte-identical checkpoint.

Loading is ``AutoModelForCausalLM.from_pretrained`` with the quantizer of
:mod:`twla.hf_quantizer` (registered by ``import twla``): it builds the model from its config
with empty ternary modules in place of the packed linears (:func:`prepare_packed_model`),
reads the tensors, then shares rotation factors and derives the kernels' buffers
(:func:`finish_packed_model`). A changed, truncated, edited or mismatched file is refused
before any tensor is read, naming it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from twla.adapters import get_adapter
from twla.fake_quant import QuantLinear
from twla.hf_quantizer import QUANT_METHOD
from twla.io import atomic_directory, check_output_dir, json_format
from twla.kernels.packing import pack_codes, unpack_codes_strided
from twla.loading import QUANT_FILE
from twla.shards import ITEMSIZE, CheckpointTensors, TensorSource, write_safetensors
from twla.ternary_linear import TernaryLinear

if TYPE_CHECKING:
    from twla.config import QuantConfig
    from twla.weights import QuantizedWeight

FORMAT = "twla-packed"
VERSION = 4  # 4: codes in contiguous bit planes per group (format 3 interleaved them at stride 4)
UPGRADABLE = (3,)  # older versions that :func:`upgrade_packed` converts
TENSOR_FILE = "model.safetensors"
REPORT_FILE = "twla_report.json"
CONFIG_FILES = ("config.json", "generation_config.json")  # digested with the tensors
CODE_TENSORS = ("weight", "alpha", "mu", "perm")  # what a packed linear's weight costs
ROTATION_TENSORS = ("rot1", "rot2")  # counted apart from the weights' bits


STORAGE_DTYPES = ("keep", "float16", "bfloat16")  # for the unquantized tensors of a checkpoint


def storage_dtype(name: str) -> torch.dtype | None:
    """The ``dtype`` argument of :func:`save_packed` for a name in :data:`STORAGE_DTYPES` (keep → None)."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage type {name!r}; choose from {', '.join(STORAGE_DTYPES)}")
    return None if name == "keep" else getattr(torch, name)


class CheckpointError(ValueError):
    """A packed checkpoint that is missing, corrupt, or does not match its model."""


@dataclass(frozen=True)
class PackedBits:
    """Sizes counted from the files of a packed checkpoint."""

    quantized_weights: int  # weights of the packed linears
    bits_per_weight: float  # bytes of codes, α, μ and column orders per packed weight, × 8
    linear_bytes: int  # codes, α, μ and column orders
    rotation_bytes: int  # online rotation factors
    embedding_bytes: int  # embeddings and lm_head
    other_bytes: int  # norms, biases and everything else
    file_bytes: int  # the tensor file on disk (with its header)
    fp16_bytes: int  # the same model with every weight in 16 bits

    def describe(self) -> str:
        return (
            f"{self.bits_per_weight:.3f} bits per packed weight (from the file: codes, α, μ, column orders); "
            f"{TENSOR_FILE} {self.file_bytes / 2**20:.1f} MiB vs {self.fp16_bytes / 2**20:.1f} MiB in fp16 "
            f"({self.fp16_bytes / self.file_bytes:.2f}×): linears {self.linear_bytes / 2**20:.1f}, embeddings "
            f"{self.embedding_bytes / 2**20:.1f}, rotations {self.rotation_bytes / 2**20:.2f}, "
            f"other {self.other_bytes / 2**20:.2f} MiB"
        )


def pack_model(model: nn.Module, weights: Mapping[str, QuantizedWeight]) -> nn.Module:
    """Replace each quantized linear named in ``weights`` (``QuantReport.weights``) by a
    :class:`TernaryLinear` on its packed codes, in place; returns the model. Rotation factors
    shared by a site's linears stay shared."""
    owners: dict[int, TernaryLinear] = {}  # id of a site's rotation factor → the first linear packed with it
    for name, weight in weights.items():
        module = model.get_submodule(name)
        if not weight.packable:
            raise NotImplementedError(
                f"{name}: the packed format stores plain ternary weights; {type(weight).__name__} records "
                "(uniform integer references, structured ternary) are not packed"
            )
        if not isinstance(module, nn.Linear | QuantLinear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a quantized linear; was it packed already?")
        packed = TernaryLinear.from_quantized(module, weight)
        rotation = getattr(module, "rot1", None)
        if rotation is not None:
            owner = owners.setdefault(id(rotation), packed)
            if owner is not packed:
                packed.share_rotation(owner)
        model.set_submodule(name, packed)
    return model


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _storage_tensor(key: str, t: Tensor, linears: Mapping[str, TernaryLinear], dtype: torch.dtype | None) -> Tensor:
    """The tensor as stored: α, μ in fp16 (they are fp16-rounded, checked), column orders in
    int16, other floating tensors in ``dtype`` (None: as they are)."""
    owner, _, leaf = key.rpartition(".")
    t = t.detach().cpu()
    if owner in linears and leaf in ("alpha", "mu"):
        half = t.half()
        if not torch.equal(half.float(), t.float()):
            raise ValueError(f"{key}: values are not representable in 16 bits; the packed format stores fp16 α, μ")
        return half
    if owner in linears and leaf == "perm":
        return t.to(torch.int16 if linears[owner].in_features <= torch.iinfo(torch.int16).max else torch.int32)
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def packed_linears(model: nn.Module) -> dict[str, TernaryLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}


def linear_settings(linears: Mapping[str, TernaryLinear]) -> tuple[dict, dict]:
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
    model: nn.Module | None = None, method: str = "", settings: tuple[dict, dict] | None = None
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
    linears: Mapping[str, TernaryLinear],
    tied: Mapping[str, str],
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
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return stored_tensors(model.state_dict().items(), packed_linears(model), tied, dtype)


def save_packed(
    model: PreTrainedModel,
    tokenizer,
    path: str,
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
    and ``provenance`` (what it was calibrated on, :func:`twla.data.provenance`) are recorded
    in ``twla_quant.json``;
    ``report`` (run metadata, e.g. timings) in ``twla_report.json``. An existing checkpoint at
    ``path`` is replaced only with ``overwrite``; anything else there is never touched.
    ``dtype`` (e.g. ``torch.float16``) stores the unquantized floating tensors (embeddings,
    norms, biases, rotation factors) in that type; None keeps them as they are, so the loaded
    model is bit-identical. ``source`` names the full-precision model it was quantized from
    (:func:`twla.loading.model_reference`; ``twla generate --compare`` loads it). Returns the
    sizes counted from the file.
    """
    check_output_dir(path, "packed checkpoint", is_packed_checkpoint, overwrite)
    linears = packed_linears(model)
    if not linears:
        raise ValueError("the model has no packed ternary linears; call pack_model(model, report.weights) first")
    unpacked = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if unpacked:
        raise ValueError(f"{len(unpacked)} quantized linears are not packed (e.g. {unpacked[0]}); call pack_model")
    # a packed model must not mix with dense decoder linears: every site linear is packed
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for site_linear in adapter.linear_names():
            if not isinstance(layer.get_submodule(site_linear), TernaryLinear):
                raise ValueError(f"{adapter.layers}.{index}.{site_linear} is not packed; pack every layer")
    with atomic_directory(path) as tmp:
        return write_packed(
            tmp,
            model.config,
            getattr(model, "generation_config", None),
            tokenizer,
            {key: TensorSource.of(t) for key, t in packed_state_dict(model, dtype).items()},
            quantization_config(model, method),
            sorted({f"{adapter.embed}.weight", f"{adapter.head}.weight"}),
            config=config,
            provenance=provenance,
            report=report,
            source=source,
        )


def write_packed(
    directory: str,
    model_config: PretrainedConfig,
    generation_config: GenerationConfig | None,
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
        name: _sha256(os.path.join(directory, name))
        for name in (TENSOR_FILE, *CONFIG_FILES)
        if os.path.isfile(os.path.join(directory, name))
    }
    bits = _count_bits(directory, meta)
    meta["bits"] = asdict(bits)
    meta["digest"] = _meta_digest(meta)
    with open(os.path.join(directory, QUANT_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, default=str)
    if report is not None:
        with open(os.path.join(directory, REPORT_FILE), "w", encoding="utf-8") as fh:
            json.dump(dict(report), fh, indent=2, default=str)
    return bits


def _meta_digest(meta: Mapping) -> str:
    """SHA-256 of ``twla_quant.json``'s content (all but the digest itself), canonically serialized."""
    content = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def is_packed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory holding a twla packed checkpoint (by its ``twla_quant.json``)."""
    return json_format(os.path.join(path, QUANT_FILE)) == FORMAT


def _refuse_version(where: str, version, path: str) -> None:
    advice = (
        f"convert it with `twla upgrade {path} --out NEW_DIRECTORY`"
        if version in UPGRADABLE
        else "quantize the model again with this version"
    )
    raise CheckpointError(f"{where}: format version {version} is not supported (this is {VERSION}); {advice}")


def read_meta(path: str, upgradable: bool = False) -> dict:
    """``twla_quant.json`` of a packed checkpoint, checked for format and version (``upgradable``:
    also an older version that :func:`upgrade_packed` converts)."""
    file = os.path.join(path, QUANT_FILE)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a checkpoint directory")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path!r} is not a packed twla checkpoint (no {QUANT_FILE})")
    try:
        with open(file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} does not describe a packed checkpoint (format {FORMAT!r} expected)")
    if not (meta.get("version") == VERSION or upgradable and meta.get("version") in UPGRADABLE):
        _refuse_version(file, meta.get("version"), path)
    missing = {"linears", "files", "digest", "model_type", "embeddings"} - set(meta)
    if missing:
        raise CheckpointError(f"{file} is incomplete: no {', '.join(sorted(missing))}")
    if _meta_digest(meta) != meta["digest"]:
        raise CheckpointError(f"{file} was edited: its content does not match its digest")
    return meta


def read_config(path: str) -> QuantConfig:
    """The :class:`~twla.config.QuantConfig` a packed checkpoint was quantized with; quantizing
    the same model on the same calibration windows with it gives the same tensors."""
    from twla.config import QuantConfig  # the solver side, not needed to load and run a checkpoint

    meta = read_meta(path)
    try:
        return QuantConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path!r} does not record a configuration this twla can rebuild: {err}") from err


def _count_bits(path: str, meta: Mapping) -> PackedBits:
    file = os.path.join(path, TENSOR_FILE)
    linears = meta["linears"]
    groups = {"linear": 0, "rotation": 0, "embedding": 0, "other": 0}
    fp16_params = 0
    with safe_open(file, framework="pt") as fh:
        for key in fh.keys():
            view = fh.get_slice(key)
            numel = math.prod(view.get_shape())
            nbytes = numel * ITEMSIZE[view.get_dtype()]
            owner, _, leaf = key.rpartition(".")
            if owner in linears and leaf in CODE_TENSORS:
                groups["linear"] += nbytes
            elif owner in linears and leaf in ROTATION_TENSORS:
                groups["rotation"] += nbytes
            else:
                groups["embedding" if key in meta["embeddings"] else "other"] += nbytes
                fp16_params += numel
    count = sum(s["in_features"] * s["out_features"] for s in linears.values())
    return PackedBits(
        quantized_weights=count,
        bits_per_weight=8 * groups["linear"] / count,
        linear_bytes=groups["linear"],
        rotation_bytes=groups["rotation"],
        embedding_bytes=groups["embedding"],
        other_bytes=groups["other"],
        file_bytes=os.path.getsize(file),
        fp16_bytes=2 * (count + fp16_params),
    )


def packed_bits(path: str) -> PackedBits:
    """Sizes and bits per weight of a packed checkpoint, counted from its files."""
    return _count_bits(path, read_meta(path))


def upgrade_packed(source: str, path: str, overwrite: bool = False) -> PackedBits:
    """Convert the packed checkpoint ``source`` of an older format version (:data:`UPGRADABLE`)
    to this version at ``path`` (atomically; ``source`` is only read). Version 3 differs in the
    order of the codes inside each packed weight (k = 4r + j in bits 2j..2j+1 of row r); every
    code, grid and other tensor is the same, so the model computes the same outputs."""
    meta = read_meta(source, upgradable=True)
    if meta["version"] == VERSION:
        raise ValueError(f"{source!r} is already format version {VERSION}")
    check_files(source, meta)
    check_output_dir(path, "packed checkpoint", is_packed_checkpoint, overwrite, [source])
    model_config = AutoConfig.from_pretrained(source)
    settings = {**model_config.quantization_config, "version": VERSION}
    tensors = CheckpointTensors(source)
    sources = {key: tensors.source(key) for key in tensors.keys()}
    for name, linear in meta["linears"].items():
        codes = unpack_codes_strided(tensors.get(f"{name}.weight"), linear["in_features"])
        sources[f"{name}.weight"] = TensorSource.of(pack_codes(codes, linear["group_size"]))
    rewritten = {TENSOR_FILE, "config.json", QUANT_FILE}
    with atomic_directory(path) as tmp:
        for name in sorted(set(os.listdir(source)) - rewritten):  # tokenizer, generation config, run report
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        return write_packed(
            tmp,
            model_config,
            None,
            None,
            sources,
            settings,
            meta["embeddings"],
            config=meta["config"],
            provenance=meta["provenance"],
            source=meta["model"],
        )


def check_files(path: str, meta: Mapping) -> None:
    """Refuse a checkpoint whose files differ from the SHA-256 digests in its ``twla_quant.json``."""
    for name, digest in meta["files"].items():
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path!r} has no {name}")
        if _sha256(os.path.join(path, name)) != digest:
            raise CheckpointError(
                f"{os.path.join(path, name)} does not match the SHA-256 recorded in {QUANT_FILE} "
                "(the file was changed or truncated)"
            )
    if TENSOR_FILE not in meta["files"]:
        raise CheckpointError(f"{path}: {QUANT_FILE} records no digest of {TENSOR_FILE}")


def prepare_packed_model(model: PreTrainedModel, settings: Mapping, files: list[str]) -> None:
    """Before ``from_pretrained`` reads the tensors of a packed checkpoint: check its files
    (against their digests when ``twla_quant.json`` is there, and the tensor names and shapes
    against the model), and put empty :class:`TernaryLinear` modules in place of the packed
    linears, on the device the model is being built on (no dense weights are allocated)."""
    path = os.path.dirname(files[0])
    if settings.get("format") != FORMAT:
        raise CheckpointError(f"{path}: packed format {settings.get('format')!r} is not supported ({FORMAT!r} is)")
    if settings.get("version") != VERSION:
        _refuse_version(f"{path} (config.json)", settings.get("version"), path)
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
                module = TernaryLinear.from_settings(spec)
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


def finish_packed_model(model: nn.Module, settings: Mapping, prefix: str = "") -> None:
    """After ``from_pretrained`` has read the tensors: share each site's rotation factors and
    compute the buffers derived from the stored ones (of the linears under ``prefix`` when
    ``model`` is the module there, e.g. one decoder layer)."""
    for name, source in settings.get("rotation_sources", {}).items():
        if name.startswith(prefix):
            model.get_submodule(name.removeprefix(prefix)).share_rotation(
                model.get_submodule(source.removeprefix(prefix))
            )
    for module in packed_linears(model).values():
        if not module.has_offset:  # μ = 0 is not stored
            module.mu = torch.zeros_like(module.alpha)
        module.refresh()


def load_packed(
    path: str, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, object, dict]:
    """Rebuild ``(model, tokenizer, meta)`` from a packed checkpoint, through
    ``AutoModelForCausalLM.from_pretrained`` (which ``import twla`` teaches the packed format);
    ``dtype`` is that of the unquantized parameters and activations (α, μ and codes keep
    their own). ``meta`` is the checkpoint's ``twla_quant.json``."""
    meta = read_meta(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    has_tokenizer = any(f.startswith(("tokenizer", "vocab", "merges")) for f in os.listdir(path))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model, tokenizer, meta
