"""The packed checkpoint format: a quantized model in 1.6 bits per ternary weight (and b bits for
the linears of a mixed-precision model that are b-bit integers), its files, and the checks
that reading it makes (saving: :mod:`twla.deploy.save`; loading: :mod:`twla.deploy.load`).

A checkpoint is a directory written atomically, in the layout of a transformers checkpoint:

- ``config.json`` (and ``generation_config.json``): the model's own config, with a
  ``quantization_config`` (:func:`quantization_config`: quant_method ``twla``, format and
  version, the method, each packed linear's shape, group size, activation settings and
  whether it shares its site's rotation factors);
- the tokenizer's files;
- ``model.safetensors``: every tensor once (the tied embedding once). Each
  :class:`~twla.deploy.ternary_linear.TernaryLinear` stores ``weight`` (uint8 codes c = t + 1, five
  per byte in base 3 along the input, :mod:`twla.kernels.trits`, shape (N, ⌈K/5⌉)), ``alpha`` and
  ``mu`` (fp16, per (group,
  row)), ``perm`` (int16 column order, when the blocks were reordered), ``rot1``/``rot2``
  (the online rotation factors, on the first linear of a site) and its bias. An
  :class:`~twla.deploy.integer_linear.IntegerLinear` (settings ``kind`` ``integer`` and ``bits``)
  stores ``weight`` (the b bit planes of its codes, :mod:`twla.kernels.integer`), ``scale`` (fp16)
  and ``zero`` (the bit planes of its zero points) instead of ``weight``, ``alpha``, ``mu``; the
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
:mod:`twla.deploy.hf_quantizer` (registered by ``import twla``): it builds the model from its config
with empty ternary modules in place of the packed linears (:func:`prepare_packed_model`),
reads the tensors, then shares rotation factors and derives the kernels' buffers
(:func:`finish_packed_model`). A changed, truncated, edited or mismatched file is refused
before any tensor is read, naming it."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from twla.io import json_format
from twla.models.shards import ITEMSIZE

if TYPE_CHECKING:
    from twla.quantization.config import QuantConfig

QUANT_FILE = "twla_quant.json"  # marks a packed checkpoint
QUANT_METHOD = "twla"  # its quant_method in config.json, under which the transformers quantizer is registered
FORMAT = "twla-packed"
# 4: ternary codes in contiguous 2-bit planes per group (format 3 interleaved them at stride 4); 5: integer
# linears; 6: ternary codes in base 3, five a byte
VERSION = 6
READABLE = (VERSION,)  # versions read as they are
UPGRADABLE = (3, 4, 5)  # older versions that :func:`upgrade_packed` converts
TENSOR_FILE = "model.safetensors"
REPORT_FILE = "twla_report.json"
CONFIG_FILES = ("config.json", "generation_config.json")  # digested with the tensors
CODE_TENSORS = ("weight", "alpha", "mu", "scale", "zero", "perm")  # what a packed linear's weight costs
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
    bits_per_weight: float  # bytes of codes, grids (α, μ or scale, zero) and column orders per packed weight, × 8
    linear_bytes: int  # codes, grids and column orders
    rotation_bytes: int  # online rotation factors
    embedding_bytes: int  # embeddings and lm_head
    other_bytes: int  # norms, biases and everything else
    file_bytes: int  # the tensor file on disk (with its header)
    fp16_bytes: int  # the same model with every weight in 16 bits

    def describe(self) -> str:
        return (
            f"{self.bits_per_weight:.3f} bits per packed weight (from the file: codes, grids, column orders); "
            f"{TENSOR_FILE} {self.file_bytes / 2**20:.1f} MiB vs {self.fp16_bytes / 2**20:.1f} MiB in fp16 "
            f"({self.fp16_bytes / self.file_bytes:.2f}×): linears {self.linear_bytes / 2**20:.1f}, embeddings "
            f"{self.embedding_bytes / 2**20:.1f}, rotations {self.rotation_bytes / 2**20:.2f}, "
            f"other {self.other_bytes / 2**20:.2f} MiB"
        )


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def meta_digest(meta: Mapping) -> str:
    """SHA-256 of ``twla_quant.json``'s content (all but the digest itself), canonically serialized."""
    content = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def is_packed_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory holding a twla packed checkpoint (by its ``twla_quant.json``)."""
    return json_format(os.path.join(path, QUANT_FILE)) == FORMAT


def refuse_version(where: str, version, path: str) -> None:
    advice = (
        f"convert it with `twla upgrade {path} --out NEW_DIRECTORY`"
        if version in UPGRADABLE and version not in READABLE
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
    if not (meta.get("version") in READABLE or upgradable and meta.get("version") in UPGRADABLE):
        refuse_version(file, meta.get("version"), path)
    missing = {"linears", "files", "digest", "model_type", "embeddings"} - set(meta)
    if missing:
        raise CheckpointError(f"{file} is incomplete: no {', '.join(sorted(missing))}")
    if meta_digest(meta) != meta["digest"]:
        raise CheckpointError(f"{file} was edited: its content does not match its digest")
    return meta


def read_config(path: str) -> QuantConfig:
    """The :class:`~twla.quantization.config.QuantConfig` a packed checkpoint was quantized with; quantizing
    the same model on the same calibration windows with it gives the same tensors."""
    from twla.quantization.config import QuantConfig  # the solver side, not needed to load and run a checkpoint

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


def check_files(path: str, meta: Mapping) -> None:
    """Refuse a checkpoint whose files differ from the SHA-256 digests in its ``twla_quant.json``."""
    for name, digest in meta["files"].items():
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path!r} has no {name}")
        if sha256_file(os.path.join(path, name)) != digest:
            raise CheckpointError(
                f"{os.path.join(path, name)} does not match the SHA-256 recorded in {QUANT_FILE} "
                "(the file was changed or truncated)"
            )
    if TENSOR_FILE not in meta["files"]:
        raise CheckpointError(f"{path}: {QUANT_FILE} records no digest of {TENSOR_FILE}")
