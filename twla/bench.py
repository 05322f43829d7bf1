"""The main job: quantize one model with several methods and bench them side by side.

Every method starts from the same full-precision weights, sees the same calibration
windows and is evaluated on the same tokens, so the rows of the table compare.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from twla.accounting import count_bits
from twla.adapters import get_adapter
from twla.config import QuantConfig, method_config
from twla.data import calibration_windows, check_disjoint, evaluation_windows, load_text, tokenize
from twla.evaluate import perplexity
from twla.models import DEFAULT_MODEL, load_model, save_checkpoint
from twla.quantize import quantize
from twla.report import plot_layer_errors, plot_weight_histograms, write_report

DEFAULT_METHODS = ("absmean", "absmean+gptq", "pt2", "pt2+gptq+ssr", "e2m", "e2m+gptq+ssr")


@dataclass
class BenchConfig:
    """Model, methods, data and output of a bench run (see ``twla bench --help``)."""

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = DEFAULT_METHODS
    calibration: str = "emma+mansfieldpark"
    evaluation: str = "prideprejudice"
    nsamples: int = 32
    seqlen: int = 512
    eval_seqlen: int = 512
    eval_tokens: int | None = 20480
    seed: int = 0
    device: str | None = None
    batch_size: int = 8
    out: str = "runs/latest"
    save: tuple[str, ...] = field(default_factory=tuple)
    histogram_layer: str | None = None  # default: the middle layer's down_proj

    def __post_init__(self) -> None:
        for spec in (*self.methods, *self.save):
            method_config(spec)  # fail early on a bad spec
        unknown = set(self.save) - set(self.methods)
        if unknown:
            raise ValueError(f"--save names methods that are not benched: {', '.join(sorted(unknown))}")


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the bench and write its report; returns the report as a dict."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg.model)
    adapter = get_adapter(model)
    cal_text = load_text(cfg.calibration, role="calibration")
    eval_text = load_text(cfg.evaluation, role="evaluation")
    check_disjoint(cal_text, eval_text)
    calib = calibration_windows(tokenize(tokenizer, cal_text), cfg.nsamples, cfg.seqlen, cfg.seed)
    windows = evaluation_windows(tokenize(tokenizer, eval_text), cfg.eval_seqlen, cfg.eval_tokens)

    layers = adapter.decoder_layers(model)
    hist_name = cfg.histogram_layer or f"{adapter.layers}.{len(layers) // 2}.{adapter.sites[-1].linears[-1]}"
    names = [f"{adapter.layers}.{i}.{path}" for i in range(len(layers)) for path in adapter.linear_names()]
    original = {name: model.get_submodule(name).weight.detach().clone() for name in names}

    def evaluate(label: str):
        start = time.perf_counter()
        result = perplexity(model, windows, eval_text.name, cfg.batch_size, device, progress)
        if progress:
            print(f"{label}: perplexity {result.ppl:.3f} on {result.describe()}", flush=True)
        return result, time.perf_counter() - start

    fp, fp_seconds = evaluate("full precision")
    fp_bits = count_bits(model, adapter, {})
    rows = [
        {
            "method": "fp",
            "ppl": fp.ppl,
            "bits_storage": 16.0,
            "bits_entropy": 16.0,
            "size_mb": fp_bits.fp16_size_bytes / 2**20,
            "eval_seconds": fp_seconds,
        }
    ]
    histograms = {}
    accounting = ""
    for spec in cfg.methods:
        with torch.no_grad():
            for name, w in original.items():
                model.get_submodule(name).weight.copy_(w)
        qcfg = QuantConfig(weights=method_config(spec), batch_size=cfg.batch_size)
        model, report = quantize(model, qcfg, calib, device, progress)
        result, eval_seconds = evaluate(spec)
        bits = count_bits(model, adapter, report.weights)
        accounting = bits.describe()
        histograms[spec] = model.get_submodule(hist_name).weight.detach().clone()
        stage_names = report.records[0].stages.keys()
        rows.append(
            {
                "method": spec,
                "ppl": result.ppl,
                "bits_storage": bits.storage_bits_per_weight,
                "bits_entropy": bits.entropy_bits_per_weight,
                "size_mb": bits.size_bytes / 2**20,
                "output_error": sum(r.output_error for r in report.records) / len(report.records),
                "quant_seconds": report.seconds,
                "eval_seconds": eval_seconds,
                "stages": {
                    s: {
                        k: sum(r.stages[s][k] for r in report.records) / len(report.records)
                        for k in ("weight_error", "output_error")
                    }
                    for s in stage_names
                },
                "bits": asdict(bits),
                "config": asdict(qcfg),
                "layers": report.to_dict()["layers"],
            }
        )
        if spec in cfg.save:
            meta = {"method": spec, "config": asdict(qcfg), "bits": asdict(bits), "format": "fake-quantized"}
            save_checkpoint(
                model,
                tokenizer,
                os.path.join(cfg.out, "models", spec.replace("+", "_")),
                {"twla_quant.json": json.dumps(meta, indent=2)},
            )

    result = {
        "setup": {
            **asdict(cfg),
            "device": device,
            "evaluation": fp.describe(),
            "calibration": f"{cal_text.name}: {cfg.nsamples} windows × {cfg.seqlen} tokens, seed {cfg.seed}",
            "accounting": accounting or "no quantized method",
            "host": platform.node(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    text = write_report(cfg.out, result)
    plot_layer_errors(rows, os.path.join(cfg.out, "layer_errors.png"))
    plot_weight_histograms(hist_name, original[hist_name], histograms, os.path.join(cfg.out, "weight_hist.png"))
    if progress:
        print(
            "\n"
            + text
            + f"\n\nReport written to {cfg.out}/ (report.md, report.json, layer_errors.png, weight_hist.png)"
        )
    return result
