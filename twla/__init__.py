"""twla: post-training ternary-weight quantization of LLMs as explicit optimization problems.

Typical use::

    import twla
    model, tokenizer = twla.load_model("smollm2-135m")
    calib = twla.calibration_windows(twla.tokenize(tokenizer, twla.load_text("emma")), 32, 512, seed=0)
    model, report = twla.quantize(model, twla.QuantConfig.from_method("e2m+gptq"), calib)
    windows = twla.evaluation_windows(twla.tokenize(tokenizer, twla.load_text("prideprejudice")), 512)
    print(twla.perplexity(model, windows).ppl)
"""

from twla.accounting import BitReport, count_bits
from twla.adapters import ADAPTERS, Adapter, Site, get_adapter
from twla.bench import BenchConfig, run_bench
from twla.config import QuantConfig, TernaryConfig, method_config
from twla.data import calibration_windows, evaluation_windows, load_text, tokenize
from twla.evaluate import Perplexity, perplexity
from twla.models import load_model, save_checkpoint
from twla.quantize import LayerRecord, QuantReport, quantize
from twla.weights import TernaryWeight, quantize_weight

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BenchConfig",
    "BitReport",
    "LayerRecord",
    "Perplexity",
    "QuantConfig",
    "QuantReport",
    "Site",
    "TernaryConfig",
    "TernaryWeight",
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
    "tokenize",
]
