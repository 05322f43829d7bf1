"""Holding one decoder layer at a time: models built on the meta device, layers filled from
tensor files and dropped back, freed heap pages returned to the system; and how much memory
this process holds."""

from __future__ import annotations

import ctypes
import functools
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from transformers.initialization import no_init_weights

from twla.models.adapters import Adapter


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` from the C library already loaded in this process (None elsewhere)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Every layer read in turn frees and reallocates tensors of the same sizes, in an order the heap
    cannot always reuse in place: its free but resident pages would grow with the number of
    layers read, and with them the peak memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resident_memory() -> dict[str, float]:
    """This process's resident memory now and its peak since its exec, in MiB: ``resident_mb``
    and ``peak_mb`` (VmRSS and VmHWM of ``/proc/self/status``). Without that file, only the peak,
    from ``getrusage`` (which would carry a parent's high-water mark over fork and exec)."""
    keys = {"VmRSS:": "resident_mb", "VmHWM:": "peak_mb"}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            found = {keys[f[0]]: int(f[1]) / 1024 for f in map(str.split, fh) if f and f[0] in keys}
    except OSError:
        found = {}
    if "peak_mb" not in found:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
        found["peak_mb"] = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return found


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init); buffers
    stay real, so tables computed at construction (rotary frequencies) are as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register


def assign(module: nn.Module, key: str, tensor: Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    parent = module.get_submodule(owner)
    if leaf in parent._parameters:
        parent._parameters[leaf] = nn.Parameter(tensor, requires_grad=parent._parameters[leaf].requires_grad)
    else:
        parent._buffers[leaf] = tensor


def to_meta(layer: nn.Module, buffers: bool = False) -> None:
    """Put the layer's parameters (and ``buffers``) on the meta device, and return the freed memory
    to the system. They are replaced, not changed in place: an autograd graph may still hold the
    old ones."""
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for name, b in module._buffers.items() if buffers else ():
            if b is not None:
                module._buffers[name] = b.to("meta")
    return_freed_memory()


def layer_prefix(adapter: Adapter, index: int) -> str:
    return f"{adapter.layers}.{index}."
