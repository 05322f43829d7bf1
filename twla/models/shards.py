"""Safetensors files one tensor at a time: reading a (sharded) checkpoint lazily, writing a tensor file
from a stream of tensors.

Reading memory-maps the checkpoint's files and materializes only the tensors asked for, so a
decoder layer can be loaded without the rest of the model. Writing lays the file out exactly as
``safetensors.torch.save_file`` does (tensors sorted by dtype, widest first, then by name; the
JSON header padded with spaces to 8 bytes), so the same tensors give the same bytes whether they
come from memory or from earlier files, while only one tensor is in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors' dtype names, in the order its files sort them (widest first, as save_file does)
_DTYPES = (
    ("U64", torch.uint64),
    ("I64", torch.int64),
    ("F64", torch.float64),
    ("F32", torch.float32),
    ("U32", torch.uint32),
    ("I32", torch.int32),
    ("BF16", torch.bfloat16),
    ("F16", torch.float16),
    ("U16", torch.uint16),
    ("I16", torch.int16),
    ("I8", torch.int8),
    ("U8", torch.uint8),
    ("BOOL", torch.bool),
)
_RANK = {name: i for i, (name, _) in enumerate(_DTYPES)}
_CODE = {dtype: name for name, dtype in _DTYPES}
ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in _DTYPES}


@dataclass(frozen=True)
class TensorSource:
    """A tensor to be written: its safetensors dtype name and shape, and how to get it (called once)."""

    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], Tensor]

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSource:
        if tensor.dtype not in _CODE:
            raise TypeError(f"safetensors cannot store {tensor.dtype}")
        return cls(_CODE[tensor.dtype], tuple(tensor.shape), lambda: tensor)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


class CheckpointTensors:
    """The tensors of a checkpoint directory's safetensors files (``model.safetensors`` or the shards
    of ``model.safetensors.index.json``), each read on demand from its memory-mapped file."""

    def __init__(self, path: str) -> None:
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index: {err}") from err
            self.files = {key: os.path.join(path, name) for key, name in weight_map.items()}
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            self.files = dict.fromkeys(self._keys(os.path.join(path, SINGLE_FILE)), os.path.join(path, SINGLE_FILE))
        else:
            raise FileNotFoundError(
                f"{path!r} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}); layer-by-layer loading "
                "reads safetensors only: quantize it in memory instead (--in-memory)"
            )
        for file in sorted(set(self.files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path!r}: its index names {os.path.basename(file)}, which is missing")
        self.path = path

    @classmethod
    def of_files(cls, files: list[str]) -> CheckpointTensors:
        """The tensors of the given safetensors files (each tensor in one of them)."""
        self = cls.__new__(cls)
        self.files = {key: file for file in files for key in cls._keys(file)}
        self.path = os.path.dirname(files[0]) if files else ""
        return self

    @staticmethod
    def _keys(file: str) -> list[str]:
        try:
            with safe_open(file, framework="pt") as fh:
                return list(fh.keys())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from err

    @contextmanager
    def _open(self, key: str) -> Iterator:
        """The file holding ``key``, memory-mapped only while it is read (mapped pages would
        otherwise stay resident for the life of the handle)."""
        if key not in self.files:
            raise KeyError(f"{self.path!r} has no tensor {key!r}")
        try:
            with safe_open(self.files[key], framework="pt") as fh:
                yield fh
        except SafetensorError as err:
            raise ValueError(f"{self.files[key]}: cannot read {key}: {err}") from err

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def shape(self, key: str) -> tuple[int, ...]:
        with self._open(key) as fh:
            return tuple(fh.get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor ``key`` in memory (its own copy, in ``dtype`` when given)."""
        with self._open(key) as fh:
            tensor = fh.get_tensor(key)
            return tensor.to(dtype=dtype or tensor.dtype, copy=True)

    def source(self, key: str) -> TensorSource:
        with self._open(key) as fh:
            view = fh.get_slice(key)
            return TensorSource(view.get_dtype(), tuple(view.get_shape()), lambda: self.get(key))


def write_safetensors(path: str, tensors: Mapping[str, TensorSource], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` to the safetensors file ``path``, one at a time, in ``save_file``'s layout."""
    order = sorted(tensors, key=lambda name: (_RANK[tensors[name].dtype], name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        source = tensors[name]
        header[name] = {
            "dtype": source.dtype,
            "shape": list(source.shape),
            "data_offsets": [offset, offset + source.nbytes],
        }
        offset += source.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name in order:
            source = tensors[name]
            tensor = source.load().detach().cpu().contiguous()
            if (_CODE.get(tensor.dtype), tuple(tensor.shape)) != (source.dtype, source.shape):
                raise ValueError(
                    f"{name}: announced as {source.dtype}{list(source.shape)}, got {tensor.dtype}{list(tensor.shape)}"
                )
            fh.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
