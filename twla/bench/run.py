"""The main job: quantize a model with several methods, evaluate each against full
precision (perplexity, zero-shot tasks, bits, time), and write the report."""

from __future__ import annotations

import copy
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from twla.bench.config import BenchConfig
from twla.bench.cpu_speed import model_speed
from twla.bench.plots import (
    plot_allocations,
    plot_cost_predictions,
    plot_frontier,
    plot_layer_errors,
    plot_rotation_histograms,
    plot_weight_histograms,
)
from twla.bench.report import report_dict, write_report
from twla.bench.rows import REPORT_FORMAT, MethodRow, spread
from twla.data.text import (
    Text,
    bos_token,
    calibration_windows,
    check_disjoint,
    check_no_overlap,
    evaluation_windows,
    load_text,
    provenance,
    tokenize,
)
from twla.deploy.format import storage_dtype
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.evaluate.generation import continuations
from twla.evaluate.perplexity import perplexity
from twla.evaluate.tasks import (
    Task,
    TaskResult,
    build_tasks,
    check_tasks_disjoint,
    evaluate_tasks,
)
from twla.io import atomic_directory, check_output_dir, json_format
from twla.models.adapters import get_adapter
from twla.models.loading import (
    ModelSource,
    check_window_length,
    load_model,
    model_reference,
    model_source,
    resolve_device,
)
from twla.models.memory import resident_memory
from twla.quantization.accounting import ACCOUNTING_RULES, count_bits
from twla.quantization.allocation import uniform_bits
from twla.quantization.config import QuantConfig
from twla.quantization.pipeline import quantize
from twla.quantization.records import LayerRecord
from twla.quantization.weight_allocation import format_config


def scheme(config: QuantConfig) -> str:
    """W1.58A4-style label of a configuration (mixed weight formats and activation bits show their range)."""
    w = config.weights.label
    if config.weight_allocation:
        labels = [format_config(o, config.weights).label.removeprefix("W") for o in config.weight_allocation.options]
        w = f"W{'/'.join(labels)}"
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
    if rot.relocation is not None:
        parts.append("relocated")
    return " + ".join(parts) or "none"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


PIPELINE_KEYS = ("seconds", "calls", "resident_mb", "peak_mb")


def _step(seconds: float) -> dict:
    """A bench step's entry beside the pipeline's stages: its time and the process's memory after it."""
    return {"seconds": seconds, "calls": 1, **resident_memory()}


def is_bench_report(path: str) -> bool:
    """Whether ``path`` is a directory holding a report written by :func:`run_bench`."""
    return json_format(os.path.join(path, "report.json")) == REPORT_FORMAT


def _save_and_reload(
    model, tokenizer, report, spec: str, qcfg: QuantConfig, cfg: BenchConfig, run, evaluate
) -> tuple[dict, dict[str, dict]]:
    """Pack the quantized model, save it into the report being written (``run.staging``), load it
    back from disk and evaluate the loaded model; the report names its final path. Returns the
    report's packed entry and the bench steps it took (time and memory)."""
    relative = os.path.join("models", spec.replace("+", "_"))
    staged, final = os.path.join(run.staging, relative), os.path.join(cfg.out, relative)
    dtype = storage_dtype(cfg.save_dtype)
    seed = cfg.seeds[0]
    start = time.perf_counter()
    files = save_packed(
        pack_model(model, report.weights),
        tokenizer,
        staged,
        method=spec,
        config=qcfg.to_dict(),
        provenance=run.provenance[seed],
        dtype=dtype,
        source=model_reference(cfg.model),
    )
    loaded, _, _ = load_packed(staged, device=run.device)
    steps = {"save and load back": _step(time.perf_counter() - start)}
    result, seconds = evaluate(f"{spec} (packed, loaded back)", loaded)
    steps["evaluation, packed"] = _step(seconds)
    speed = {}
    if run.device.type == "cpu":
        start = time.perf_counter()
        speed["speed"] = model_speed(loaded)
        steps["CPU speed, packed"] = _step(time.perf_counter() - start)
    return {"path": final, "ppl": result.ppl, "eval_seconds": seconds, **asdict(files), **speed}, steps


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the bench and write its report directory (atomically: all of it, or nothing);
    returns the report as a dict. Everything that can be refused is checked before the
    model's weights are read."""
    device = resolve_device(cfg.device)
    source = model_source(cfg.model)
    check_output_dir(
        cfg.out, "bench report", is_bench_report, overwrite=cfg.overwrite, protect=[source.path] if source.local else []
    )
    check_window_length(source, cfg.seqlen, "seqlen")
    check_window_length(source, cfg.eval_seqlen, "eval_seqlen")
    cal_text = load_text(cfg.calibration, role="calibration")
    eval_text = load_text(cfg.evaluation, role="evaluation")
    check_disjoint(cal_text, eval_text)
    cal_ids = tokenize(source.tokenizer, cal_text)
    bos = bos_token(source.tokenizer)
    calib = {seed: calibration_windows(cal_ids, cfg.nsamples, cfg.seqlen, seed=seed, bos=bos) for seed in cfg.seeds}
    windows = evaluation_windows(
        tokenize(source.tokenizer, eval_text), cfg.eval_seqlen, max_tokens=cfg.eval_tokens, bos=bos
    )
    check_no_overlap(cal_ids, windows)
    tasks = build_tasks(cfg.tasks)
    check_tasks_disjoint(tasks, cal_text.parts)
    with atomic_directory(cfg.out) as staging:
        origin = {seed: provenance(cal_text, c, seed) for seed, c in calib.items()}
        run = _Run(source, calib, windows, cal_text, eval_text, device, staging, origin, tasks, bos)
        result = _bench(cfg, run, progress)
    if progress:
        print(f"\nReport written to {cfg.out}/ ({', '.join(sorted(os.listdir(cfg.out)))})")
    return result


@dataclass
class _Run:
    """What a bench run has resolved before its first model is loaded."""

    source: ModelSource
    calib: dict[int, torch.Tensor]  # calibration windows per seed
    windows: torch.Tensor
    cal_text: Text
    eval_text: Text
    device: torch.device
    staging: str  # the report directory being written
    provenance: dict[int, dict]  # per seed
    tasks: list[Task]
    bos: int | None  # the token every window starts with, if the tokenizer adds one


def accuracy(scores: dict[int, list[TaskResult]]) -> dict[str, dict] | None:
    """A row's accuracy per task: mean and std of the headline metric over seeds, and the first
    seed's items, standard error and metrics."""
    if not scores or not next(iter(scores.values())):
        return None
    first = next(iter(scores.values()))
    out = {}
    for k, result in enumerate(first):
        values = spread([results[k].value for results in scores.values()])
        out[result.task] = {
            "metric": result.metric,
            "mean": values["mean"],
            "std": values["std"],
            "seeds": values["n"],
            "items": result.items,
            "stderr": result.stderr,
            "metrics": result.metrics,
        }
    return out


def _method_row(spec: str, qcfg: QuantConfig, model, report, ppl: float, eval_seconds: float) -> MethodRow:
    """The report row of one quantized model."""
    adapter = get_adapter(model)
    bits = count_bits(model, adapter, report.weights)
    records = report.records
    relocated = [r.relocation for r in records if r.relocation]
    acts = [r.act_error for r in records if r.act_error]
    recon = report.reconstruction
    return MethodRow(
        method=spec,
        scheme=scheme(qcfg),
        rotation=rotation_label(qcfg),
        ppl=ppl,
        act_bits=activation_bits(records),
        bits_storage=bits.storage_bits_per_weight,
        bits_entropy=bits.entropy_bits_per_weight,
        size_mb=bits.size_bytes / 2**20,
        output_error=_mean([r.output_error for r in records]),
        quant_seconds=report.seconds,
        rotation_seconds=report.rotation_seconds,
        eval_seconds=eval_seconds,
        stages={  # mixed weight formats have different stages: each averaged over the linears that have it
            s: {k: _mean([r.stages[s][k] for r in records if s in r.stages]) for k in ("weight_error", "output_error")}
            for s in dict.fromkeys(s for r in records for s in r.stages)
        },
        relocation={k: _mean([r[k] for r in relocated]) for k in ("before", "after")} if relocated else None,
        activations={
            "clip=1": _mean([a["clip=1"] for a in acts]),
            "calibrated": _mean([a["calibrated"] for a in acts]),
            "mean_clip": _mean([r.act_clip for r in records if r.act_error]),
        }
        if acts
        else None,
        reconstruction={
            "before": _mean([b["before"] for b in recon]),
            "after": _mean([b["after"] for b in recon]),
            "steps": _mean([b["steps"] for b in recon]),
            "seconds": sum(b["seconds"] for b in recon),
            "blocks": [{k: b[k] for k in ("layer", "before", "after", "best_step")} for b in recon],
        }
        if recon
        else None,
        end_to_end=report.end_to_end,
        shaping=report.rotation.to_dict()["sites"] if report.rotation else None,
        weight_allocation=report.weight_allocation.to_dict() if report.weight_allocation else None,
        allocation=report.allocation.to_dict() if report.allocation else None,
        bits=asdict(bits),
        config=qcfg.to_dict(),
        layers=report.to_dict()["layers"],
        pipeline={name: {k: v for k, v in e.items() if k in PIPELINE_KEYS} for name, e in report.stages.items()},
    )


def _bench(cfg: BenchConfig, run: _Run, progress: bool) -> dict:
    """Quantize, evaluate and report every method (once per seed), writing into ``run.staging``."""
    model, tokenizer = load_model(run.source)
    adapter = get_adapter(model)

    layers = adapter.decoder_layers(model)
    hist_name = cfg.histogram_layer or f"{adapter.layers}.{len(layers) // 2}.{adapter.sites[-1].linears[-1]}"
    original = model.get_submodule(hist_name).weight.detach().clone()

    def evaluate(label: str, model):
        start = time.perf_counter()
        result = perplexity(
            model, run.windows, text=run.eval_text.name, batch_size=cfg.batch_size, device=run.device, progress=progress
        )
        if progress:
            print(f"{label}: perplexity {result.ppl:.3f} on {result.describe()}", flush=True)
        return result, time.perf_counter() - start

    def score(label: str, model) -> list[TaskResult]:
        """Accuracy on the built-in tasks; the continuations of the report's prompts come with the first seed."""
        results = evaluate_tasks(model, tokenizer, run.tasks, bos=run.bos, device=run.device, progress=progress)
        if progress and results:
            print(f"{label}: " + "; ".join(r.describe() for r in results), flush=True)
        return results

    def samples(model) -> list[str]:
        texts = continuations(model.to(run.device), tokenizer)
        model.to("cpu")
        return texts

    fp, fp_seconds = evaluate("full precision", model)
    fp_bits = count_bits(model, adapter, {})
    rows = [MethodRow("fp", "W16A16", "none", fp.ppl, 16.0, 16.0, 16.0, fp_bits.fp16_size_bytes / 2**20, fp_seconds)]
    rows[0].pipeline = {"evaluation": _step(fp_seconds)}
    rows[0].accuracy = accuracy({0: score("full precision", model)})
    rows[0].samples = samples(model)
    if run.device.type == "cpu" and cfg.save:  # what the saved checkpoints' speed is judged against
        start = time.perf_counter()
        rows[0].speed = {"float32": model_speed(model)}
        rows[0].speed["bfloat16"] = model_speed(copy.deepcopy(model).to(torch.bfloat16))
        rows[0].pipeline["CPU speed"] = _step(time.perf_counter() - start)
    histograms, rotation_weights = {}, {}
    for i, spec in enumerate(cfg.methods):
        row, per_seed, scores = None, {}, {}
        for j, seed in enumerate(cfg.seeds):
            if i or j:
                model, _ = load_model(run.source)
            qcfg = cfg.quant_config(spec, seed)
            model, report = quantize(model, qcfg, run.calib[seed], device=run.device, progress=progress)
            label = spec if len(cfg.seeds) == 1 else f"{spec} (seed {seed})"
            result, eval_seconds = evaluate(label, model)
            evaluated = _step(eval_seconds)
            scores[seed] = score(label, model)
            per_seed[seed] = {
                "ppl": result.ppl,
                "quant_seconds": report.seconds,
                "accuracy": {r.task: r.value for r in scores[seed]},
            }
            al = report.allocation
            if al and al.uniform:  # ILA-AMP against uniform bits on the same model (already set if kept)
                with uniform_bits(model, get_adapter(model), al) as bits:
                    uniform = result if al.kept_uniform else evaluate(f"{label} at uniform A{bits}", model)[0]
                per_seed[seed]["uniform_ppl"] = uniform.ppl
            if row is None:  # the first seed's model is reported in detail, plotted and saved
                row = _method_row(spec, qcfg, model, report, result.ppl, eval_seconds)
                row.pipeline["evaluation"] = evaluated
                row.samples = samples(model)
                histograms[spec] = report.weights[hist_name].dequantize()
                if report.rotation:
                    rotation_weights[spec] = report.rotation.weights
                if spec in cfg.save:
                    packed, steps = _save_and_reload(model, tokenizer, report, spec, qcfg, cfg, run, evaluate)
                    row.pipeline.update(steps)
                    row.packed = {**packed, "fake_quant_ppl": result.ppl}
            del model
        row.ppl_spread = spread([r["ppl"] for r in per_seed.values()])
        row.ppl, row.seeds = row.ppl_spread["mean"], per_seed
        row.quant_seconds = _mean([r["quant_seconds"] for r in per_seed.values()])
        row.accuracy = accuracy(scores)
        rows.append(row)

    setup = {
        **asdict(cfg),
        "device": str(run.device),
        "evaluation": fp.describe(),
        "calibration": f"{run.cal_text.name}: {cfg.nsamples} windows × {cfg.seqlen} tokens, "
        + (
            f"the first {cfg.layer_windows} for the layer-wise pass, "
            if cfg.layer_windows is not None and cfg.layer_windows < cfg.nsamples
            else ""
        )
        + f"seeds {', '.join(map(str, cfg.seeds))}"
        + "".join(f"; {s}.{k} = {v} where used" for s, given in cfg.overrides.items() for k, v in given.items()),
        "accounting": ACCOUNTING_RULES,
        "task_setup": "; ".join(f"{t.name}: {len(t.items)} items from {t.corpus}, {t.metric}" for t in run.tasks)
        + (
            " (twla.evaluate.tasks: scored by log-likelihood, binomial standard error ±√(p(1−p)/n))"
            if run.tasks
            else ""
        ),
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    text = write_report(run.staging, setup, rows)
    plot_layer_errors(rows, os.path.join(run.staging, "layer_errors.png"))
    plot_frontier(rows, os.path.join(run.staging, "frontier.png"))
    plot_weight_histograms(hist_name, original, histograms, path=os.path.join(run.staging, "weight_hist.png"))
    if rotation_weights:
        plot_rotation_histograms(rotation_weights, os.path.join(run.staging, "rotation_hist.png"))
    if any(row.allocation for row in rows):
        plot_allocations(rows, os.path.join(run.staging, "allocation.png"))
        plot_cost_predictions(rows, os.path.join(run.staging, "cost_prediction.png"))
    if progress:
        print("\n" + text)
    return report_dict(setup, rows)
