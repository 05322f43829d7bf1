"""The main job: quantize one model with several methods and bench them side by side.

Every method starts from a freshly loaded full-precision model, sees the same
calibration windows and is evaluated on the same tokens, so the rows of the table compare.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from twla.accounting import ACCOUNTING_RULES, count_bits
from twla.adapters import get_adapter
from twla.checkpoint import load_packed, pack_model, save_packed, storage_dtype
from twla.config import QuantConfig, TernaryConfig
from twla.data import calibration_windows, check_disjoint, evaluation_windows, load_text, tokenize
from twla.evaluate import perplexity
from twla.models import DEFAULT_MODEL, load_model
from twla.quantize import LayerRecord, quantize
from twla.report import (
    plot_allocations,
    plot_cost_predictions,
    plot_layer_errors,
    plot_rotation_histograms,
    plot_weight_histograms,
    write_report,
)

DEFAULT_METHODS = (
    "e2m+gptq+ssr",  # W1.58A16
    "e2m+gptq+ssr+a4",  # W1.58A4, no rotation
    "e2m+gptq+ssr+had+a4",  # fixed random Kronecker-Hadamard site rotations
    "e2m+gptq+ssr+had+amp",  # + ILA-AMP: {2,4,6,8}-bit activations per decoder block, mean ≤ 4
    "e2m+gptq+ssr+had+amp-site",  # + ILA-AMP per input site
    "e2m+gptq+ssr+kotms+a4",  # KOTMS: learned on the Stiefel manifold
    "rtn4+had+a4",  # W4A4 round-to-nearest with rotation: a familiar reference
)

DEFAULT_SAVE = ("e2m+gptq+ssr", "e2m+gptq+ssr+had+amp-site")  # packed, reloaded and evaluated when benched


def scheme(config: QuantConfig) -> str:
    """W1.58A4-style label of a configuration (mixed activation bits show their range)."""
    w = "W1.58" if isinstance(config.weights, TernaryConfig) else f"W{config.weights.bits}"
    if config.allocation:
        return f"{w}A{min(config.allocation.options)}-{max(config.allocation.options)} mixed"
    bits = {config.activations.bits, *config.activations.layer_bits.values()}
    a = f"A{min(bits)}-{max(bits)}" if len(bits) > 1 else f"A{bits.pop()}"
    return w + a


def activation_bits(records: list[LayerRecord]) -> float:
    """Mean activation bits over the input elements of every site (Σ width·bits / Σ width)."""
    sites = {(r.layer, r.site): (r.shape[1], r.act_bits) for r in records}
    return sum(w * b for w, b in sites.values()) / sum(w for w, _ in sites.values())


def rotation_label(config: QuantConfig) -> str:
    rot = config.rotation
    parts = [p for p in (rot.residual != "none" and f"R1 {rot.residual}", rot.site != "none" and rot.site) if p]
    if rot.relocate:
        parts.append("relocated")
    return " + ".join(parts) or "none"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


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
    save_dtype: str = "keep"  # storage of unquantized tensors in saved checkpoints: keep, float16, bfloat16
    histogram_layer: str | None = None  # default: the middle layer's down_proj
    amp: dict = field(default_factory=dict)  # AllocationConfig overrides for amp / amp-site methods

    def __post_init__(self) -> None:
        for spec in (*self.methods, *self.save):
            QuantConfig.from_method(spec, self.amp)  # fail early on a bad spec or budget
        storage_dtype(self.save_dtype)  # fail early on an unknown storage type
        unknown = set(self.save) - set(self.methods)
        if unknown:
            raise ValueError(f"--save names methods that are not benched: {', '.join(sorted(unknown))}")
        for spec in self.save:
            if not isinstance(QuantConfig.from_method(spec).weights, TernaryConfig):
                raise ValueError(
                    f"--save {spec}: the packed checkpoint format stores ternary weights; {spec} quantizes "
                    "weights to uniform integers (a reference method)"
                )


def _save_and_reload(model, tokenizer, report, spec: str, qcfg: QuantConfig, cfg: BenchConfig, evaluate) -> dict:
    """Pack the quantized model, save it, load it back from disk and evaluate the loaded model."""
    path = os.path.join(cfg.out, "models", spec.replace("+", "_"))
    dtype = storage_dtype(cfg.save_dtype)
    files = save_packed(pack_model(model, report.weights), tokenizer, path, spec, asdict(qcfg), dtype=dtype)
    loaded, _, _ = load_packed(path)
    result, seconds = evaluate(f"{spec} (packed, loaded from {path})", loaded)
    return {"path": path, "ppl": result.ppl, "eval_seconds": seconds, **asdict(files)}


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
    original = model.get_submodule(hist_name).weight.detach().clone()

    def evaluate(label: str, model):
        start = time.perf_counter()
        result = perplexity(model, windows, eval_text.name, cfg.batch_size, device, progress)
        if progress:
            print(f"{label}: perplexity {result.ppl:.3f} on {result.describe()}", flush=True)
        return result, time.perf_counter() - start

    fp, fp_seconds = evaluate("full precision", model)
    fp_bits = count_bits(model, adapter, {})
    rows = [
        {
            "method": "fp",
            "scheme": "W16A16",
            "rotation": "none",
            "ppl": fp.ppl,
            "act_bits": 16.0,
            "bits_storage": 16.0,
            "bits_entropy": 16.0,
            "size_mb": fp_bits.fp16_size_bytes / 2**20,
            "eval_seconds": fp_seconds,
        }
    ]
    histograms, rotation_weights = {}, {}
    for i, spec in enumerate(cfg.methods):
        if i:
            model, _ = load_model(cfg.model)
        qcfg = QuantConfig.from_method(spec, cfg.amp, batch_size=cfg.batch_size)
        model, report = quantize(model, qcfg, calib, device, progress)
        result, eval_seconds = evaluate(spec, model)
        bits = count_bits(model, adapter, report.weights)
        histograms[spec] = report.weights[hist_name].dequantize()
        if report.rotation:
            rotation_weights[spec] = report.rotation.weights
        records = report.records
        relocated = [r.relocation for r in records if r.relocation]
        acts = [r.act_error for r in records if r.act_error]
        rows.append(
            {
                "method": spec,
                "scheme": scheme(qcfg),
                "rotation": rotation_label(qcfg),
                "ppl": result.ppl,
                "act_bits": activation_bits(records),
                "bits_storage": bits.storage_bits_per_weight,
                "bits_entropy": bits.entropy_bits_per_weight,
                "size_mb": bits.size_bytes / 2**20,
                "output_error": _mean([r.output_error for r in records]),
                "quant_seconds": report.seconds,
                "rotation_seconds": report.rotation_seconds,
                "eval_seconds": eval_seconds,
                "stages": {
                    s: {k: _mean([r.stages[s][k] for r in records]) for k in ("weight_error", "output_error")}
                    for s in records[0].stages
                },
                "relocation": {k: _mean([r[k] for r in relocated]) for k in ("before", "after")} if relocated else None,
                "activations": {
                    "clip=1": _mean([a["clip=1"] for a in acts]),
                    "calibrated": _mean([a["calibrated"] for a in acts]),
                    "mean_clip": _mean([r.act_clip for r in records if r.act_error]),
                }
                if acts
                else None,
                "shaping": report.rotation.to_dict()["sites"] if report.rotation else None,
                "allocation": report.allocation.to_dict() if report.allocation else None,
                "bits": asdict(bits),
                "config": asdict(qcfg),
                "layers": report.to_dict()["layers"],
            }
        )
        if spec in cfg.save:
            rows[-1]["packed"] = _save_and_reload(model, tokenizer, report, spec, qcfg, cfg, evaluate)
        del model

    result = {
        "setup": {
            **asdict(cfg),
            "device": device,
            "evaluation": fp.describe(),
            "calibration": f"{cal_text.name}: {cfg.nsamples} windows × {cfg.seqlen} tokens, seed {cfg.seed}",
            "accounting": ACCOUNTING_RULES,
            "host": platform.node(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    text = write_report(cfg.out, result)
    plot_layer_errors(rows, os.path.join(cfg.out, "layer_errors.png"))
    plot_weight_histograms(hist_name, original, histograms, os.path.join(cfg.out, "weight_hist.png"))
    plots = "layer_errors.png, weight_hist.png"
    if rotation_weights:
        plot_rotation_histograms(rotation_weights, os.path.join(cfg.out, "rotation_hist.png"))
        plots += ", rotation_hist.png"
    if any(row.get("allocation") for row in rows):
        plot_allocations(rows, os.path.join(cfg.out, "allocation.png"))
        plot_cost_predictions(rows, os.path.join(cfg.out, "cost_prediction.png"))
        plots += ", allocation.png, cost_prediction.png"
    if progress:
        print("\n" + text + f"\n\nReport written to {cfg.out}/ (report.md, report.json, {plots})")
    return result
