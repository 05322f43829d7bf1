"""twla: post-training W1.58A4 quantization of LLMs (ternary weights, low-bit activations),
built around explicit optimization problems.

Typical use::

    import twla
    model, tokenizer = twla.load_model("smollm2-135m")
    calib = twla.calibration_windows(twla.tokenize(tokenizer, twla.load_text("emma")), 32, 512, seed=0)
    model, report = twla.quantize(model, twla.QuantConfig.from_method("e2m+gptq+ssr+kotms+a4"), calib)
    windows = twla.evaluation_windows(twla.tokenize(tokenizer, twla.load_text("prideprejudice")), 512)
    print(twla.perplexity(model, windows).ppl)

Mixed-precision activations (ILA-AMP) come from ``+amp`` in the method spec, or directly from
measured or user costs::

    alloc = twla.solve_bits({"bits": [2, 4, 8], "unary": ..., "pairwise": ..., "beta": 0.5}, budget=4.0)
"""

from twla.accounting import BitReport, count_bits
from twla.adapters import ADAPTERS, Adapter, Site, get_adapter
from twla.allocation import AllocationReport, allocate
from twla.bench import BenchConfig, run_bench
from twla.config import (
    ActivationConfig,
    AllocationConfig,
    QuantConfig,
    RotationConfig,
    TernaryConfig,
    UniformConfig,
    method_config,
)
from twla.data import calibration_windows, evaluation_windows, load_text, tokenize
from twla.evaluate import Perplexity, perplexity
from twla.models import load_model, save_checkpoint
from twla.modules import QuantLinear
from twla.quantize import LayerRecord, QuantReport, quantize
from twla.rotation import RotationReport
from twla.solvers.bits import Allocation, BitCosts, InfeasibleBudgetError, Resource, solve_bits
from twla.weights import TernaryWeight, UniformWeight, quantize_weight

__all__ = [
    "ADAPTERS",
    "ActivationConfig",
    "Adapter",
    "Allocation",
    "AllocationConfig",
    "AllocationReport",
    "BenchConfig",
    "BitCosts",
    "BitReport",
    "InfeasibleBudgetError",
    "LayerRecord",
    "Perplexity",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "Resource",
    "RotationConfig",
    "RotationReport",
    "Site",
    "TernaryConfig",
    "TernaryWeight",
    "UniformConfig",
    "UniformWeight",
    "allocate",
    "calibration_windows",
    "count_bits",
    "evaluation_windows",
    "get_adapter",
    "load_model",
    "load_text",
    "method_config",
    "perplexity",
    "quantize",
    "quantize_weight",
    "run_bench",
    "save_checkpoint",
    "solve_bits",
    "tokenize",
]
