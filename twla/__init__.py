"""twla: post-training W1.58A4 quantization of LLMs (ternary weights, low-bit activations),
built around explicit optimization problems.

Typical use::

    import twla
    model, tokenizer = twla.load_model("smollm2-135m")
    calib = twla.calibration_windows(twla.tokenize(tokenizer, twla.load_text("emma")), 128, 512, seed=0)
    model, report = twla.quantize(model, twla.QuantConfig.from_method("pt2+gptq+ssr+had+a4"), calib)
    windows = twla.evaluation_windows(twla.tokenize(tokenizer, twla.load_text("prideprejudice")), 512)
    print(twla.perplexity(model, windows).ppl)

Mixed-precision activations (ILA-AMP) come from ``+amp``, ``+amp-site`` or ``+amp-fisher`` (the
default's) in the method spec, or directly from measured or user costs::

    alloc = twla.solve_bits({"bits": [2, 4, 8], "unary": ..., "pairwise": ..., "beta": 0.5}, budget=4.0)

Deployment: pack the quantized linears into ternary modules (codes stored five a byte) that
run the Triton kernels on CUDA (the torch reference elsewhere), save, and load back::

    twla.save_packed(twla.pack_model(model, report.weights), tokenizer, "out/model", method="...")
    model, tokenizer, info = twla.load_packed("out/model", device="cuda", dtype=torch.float16)

A checkpoint directory can also be quantized straight into a packed checkpoint, one decoder
layer in memory at a time (any method), and a packed checkpoint
evaluated the same way::

    config = twla.QuantConfig.from_method("pt2+gptq+had+amp-fisher+recon+e2e")  # the default method
    report, bits = twla.quantize_checkpoint("./my-llama", config, calib, path="out/model", method="...")
    with twla.streamed_packed("out/model") as (model, tokenizer, info):
        print(twla.perplexity(model, windows).ppl)

``import twla`` also registers the packed format with transformers, so
``AutoModelForCausalLM.from_pretrained("out/model")`` loads it too (``twla.deploy.hf_quantizer``).

These are the names a user needs; everything else is imported from its module (e.g.
``twla.quantization.sections.TernaryConfig``, ``twla.models.adapters.get_adapter``). Names are imported on first
use, so the deployment path (``twla.kernels``, packed modules and checkpoints) needs only
torch, triton, transformers, numpy and safetensors.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_EXPORTS = {
    "twla.bench.run": ("BenchConfig", "run_bench"),
    "twla.data.text": ("calibration_windows", "evaluation_windows", "load_text", "tokenize"),
    "twla.deploy.format": ("CheckpointError", "read_config"),
    "twla.deploy.load": ("load_packed",),
    "twla.deploy.save": ("pack_model", "save_packed"),
    "twla.deploy.streamed": ("streamed_packed",),
    "twla.evaluate.perplexity": ("perplexity",),
    "twla.kernels.dispatch": ("set_kernel_backend",),
    "twla.models.loading": ("load_model",),
    "twla.quantization.config": ("QuantConfig",),
    "twla.quantization.pipeline": ("quantize",),
    "twla.quantization.streaming": ("quantize_checkpoint",),
    "twla.solvers.bits": ("InfeasibleBudgetError", "solve_bits"),
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


_QUANTIZERS = "transformers.quantizers"  # transformers' registry of quantization methods


def _register_packed_format() -> None:
    importlib.import_module("twla.deploy.hf_quantizer").register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the packed format with transformers right after ``transformers.quantizers`` is
    imported (whoever imports it first), so that ``import twla`` stays light."""

    def find_spec(self, name, path, target=None):
        if name != _QUANTIZERS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_and_register(module) -> None:
                execute(module)
                _register_packed_format()

            spec.loader.exec_module = execute_and_register
        return spec


if _QUANTIZERS in sys.modules:
    _register_packed_format()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
