"""twla: post-training W1.58A4 quantization of LLMs (ternary weights, low-bit activations),
built around explicit optimization problems.

Typical use::

    import twla
    model, tokenizer = twla.load_model("smollm2-135m")
    calib = twla.calibration_windows(twla.tokenize(tokenizer, twla.load_text("emma")), 32, 512, seed=0)
    model, report = twla.quantize(model, twla.QuantConfig.from_method("pt2+gptq+ssr+had+a4"), calib)
    windows = twla.evaluation_windows(twla.tokenize(tokenizer, twla.load_text("prideprejudice")), 512)
    print(twla.perplexity(model, windows).ppl)

Mixed-precision activations (ILA-AMP) come from ``+amp`` in the method spec, or directly from
measured or user costs::

    alloc = twla.solve_bits({"bits": [2, 4, 8], "unary": ..., "pairwise": ..., "beta": 0.5}, budget=4.0)

Deployment: pack the quantized linears into 2-bit ternary modules that run the Triton
kernels on CUDA (the torch reference elsewhere), save, and load back::

    twla.save_packed(twla.pack_model(model, report.weights), tokenizer, "out/model", method="...")
    model, tokenizer, info = twla.load_packed("out/model", device="cuda", dtype=torch.float16)

A checkpoint directory can also be quantized straight into a packed checkpoint, one decoder
layer in memory at a time (any method), and a packed checkpoint
evaluated the same way::

    config = twla.QuantConfig.from_method("pt2+gptq+had+a4+recon+e2e")
    report, bits = twla.quantize_checkpoint("./my-llama", config, calib, "out/model", method="...")
    with twla.streamed_packed("out/model") as (model, tokenizer, info):
        print(twla.perplexity(model, windows).ppl)

``import twla`` also registers the packed format with transformers, so
``AutoModelForCausalLM.from_pretrained("out/model")`` loads it too (``twla.hf_quantizer``).

These are the names a user needs; everything else is imported from its module (e.g.
``twla.config.TernaryConfig``, ``twla.adapters.get_adapter``). Names are imported on first
use, so the deployment path (``twla.kernels``, packed modules and checkpoints) needs only
torch, triton, transformers, numpy and safetensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def _import_the_kernels_distribution() -> None:
    """Run from this source tree's root (``python -m ...``, pytest), its ``kernels/`` folder,
    installed as ``twla.kernels``, is also importable as a top-level ``kernels`` and would hide the
    ``kernels`` distribution that transformers imports when it is installed. Import that one first,
    with the tree's root off ``sys.path``, so that ``kernels`` names it for the whole process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(root, "kernels", "triton_ternary.py")):
        return
    path = sys.path[:]
    sys.path[:] = [p for p in path if os.path.abspath(p or os.curdir) != root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = path


_import_the_kernels_distribution()

from twla import hf_quantizer as _hf_quantizer  # noqa: E402, F401  (registers the packed format with transformers)

_EXPORTS = {
    "twla.bench": ("BenchConfig", "run_bench"),
    "twla.checkpoint": ("CheckpointError", "load_packed", "pack_model", "read_config", "save_packed"),
    "twla.config": ("QuantConfig",),
    "twla.data": ("calibration_windows", "evaluation_windows", "load_text", "tokenize"),
    "twla.evaluate": ("perplexity",),
    "twla.kernels.dispatch": ("set_kernel_backend",),
    "twla.loading": ("load_model",),
    "twla.pipeline": ("quantize",),
    "twla.solvers.bits": ("InfeasibleBudgetError", "solve_bits"),
    "twla.streaming": ("quantize_checkpoint", "streamed_packed"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'twla' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
