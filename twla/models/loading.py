"""Loading causal LMs (local, hub, or the built-in offline default) and saving checkpoints."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from twla.deploy.format import QUANT_FILE
from twla.io import OutputPathError, atomic_directory, check_output_dir
from twla.models.adapters import check_architecture, get_adapter
from twla.models.builtin import BUILTIN, DEFAULT_MODEL


def cache_dir() -> str:
    return os.environ.get("TWLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "twla"))


def _builtin_checkpoint(name: str) -> str:
    """Convert the built-in GGUF once to a normal checkpoint in the cache; return its path."""
    target = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    builtin = BUILTIN[name]
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".twla-gguf-", dir=cache_dir()) as work:
        src = builtin.gguf_directory(work)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=builtin.gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=builtin.gguf)
    model.hf_quantizer = None  # the GGUF weights are dequantized: store a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        save_checkpoint(model, tokenizer, target)
    except (OutputPathError, OSError):
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise
        # another process converted it at the same time: the same checkpoint, use theirs
    return target


@dataclass(frozen=True)
class ModelSource:
    """A model resolved before its weights are loaded: where it is, its config and tokenizer."""

    path: str
    config: PretrainedConfig
    tokenizer: object

    @property
    def local(self) -> bool:
        return os.path.isdir(self.path)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def model_reference(name_or_path: str) -> str:
    """How a checkpoint records the model it came from: a built-in name or hub id as given, a
    local directory as its absolute path."""
    return name_or_path if name_or_path in BUILTIN or not os.path.isdir(name_or_path) else os.path.abspath(name_or_path)


def model_source(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Resolve a built-in name, a local directory or a hub id and read its config and tokenizer,
    checking that the architecture is supported (cheap: no weights are read)."""
    if name_or_path in BUILTIN:
        path = _builtin_checkpoint(name_or_path)
    elif os.path.isdir(name_or_path):
        path = name_or_path
        if os.path.isfile(os.path.join(path, QUANT_FILE)):
            raise ValueError(
                f"{path!r} is a packed twla checkpoint, not a full-precision model: load it with "
                "twla.load_packed or evaluate it with `twla eval`"
            )
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path {name_or_path!r} is not a checkpoint directory")
    else:
        path = name_or_path  # a hub id
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: not a built-in model ({', '.join(BUILTIN)}), "
            f"not a loadable local directory, and not loadable from the hub ({err})"
        ) from err
    check_architecture(config.model_type)
    return ModelSource(path, config, tokenizer)


def load_model(
    name_or_path: str | ModelSource = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, layers: int | None = None
):
    """Load ``(model, tokenizer)`` from a built-in name, a local directory, a hub id or a
    :class:`ModelSource`.

    layers: keep only the first ``layers`` decoder blocks (their real weights, the real
    embedding, final norm and head): a smaller real model for quick experiments and tests.
    """
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be ≥ 1, got {layers}")
    source = name_or_path if isinstance(name_or_path, ModelSource) else model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"could not load the weights of {source.path!r}: {err}") from err
    model.eval()
    if layers is not None:
        keep_layers(model, layers)
    return model, source.tokenizer


def check_window_length(source: ModelSource, seqlen: int, what: str) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``)."""
    if source.max_positions is not None and seqlen > source.max_positions:
        raise ValueError(f"{what} {seqlen} exceeds the model's context of {source.max_positions} tokens")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The compute device ``name`` (default: cuda when available, else cpu), refused with a clear
    message when this machine's torch cannot use it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: this torch has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} is not available: {torch.cuda.device_count()} CUDA device(s) found")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def keep_layers(model: PreTrainedModel, count: int) -> None:
    """Cut ``model`` in place to its first ``count`` decoder blocks (config updated to match)."""
    adapter = get_adapter(model)
    blocks = adapter.decoder_layers(model)
    if not 1 <= count <= len(blocks):
        raise ValueError(f"cannot keep {count} decoder blocks: the model has {len(blocks)}")
    model.set_submodule(adapter.layers, nn.ModuleList(blocks[:count]))
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def save_checkpoint(model: PreTrainedModel, tokenizer, path: str, *, overwrite: bool = False) -> None:
    """Write a (full-precision) checkpoint atomically: into a temporary sibling directory, then
    rename. An existing checkpoint at ``path`` is replaced only with ``overwrite``; any other
    non-empty directory or file there is refused."""
    check_output_dir(path, "checkpoint", lambda p: os.path.isfile(os.path.join(p, "config.json")), overwrite=overwrite)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
