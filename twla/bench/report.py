"""Bench reports: the main table and every detailed one rendered as Markdown, written with the
run's setup as JSON, atomically (plots: :mod:`twla.bench.plots`)."""

from __future__ import annotations

import os
from dataclasses import asdict

from twla.bench.rows import REPORT_FORMAT, MethodRow, cell, ppl_cell
from twla.bench.tables import (
    ablation_table,
    activation_table,
    allocation_table,
    frontier_table,
    packed_table,
    pipeline_table,
    reconstruction_table,
    rotation_choice_table,
    seed_table,
    shaping_table,
    speed_table,
    stage_table,
    weight_allocation_table,
)
from twla.evaluate.generation import REPORT_PROMPTS, REPORT_TOKENS
from twla.io import write_json, write_text

COLUMNS = [
    ("method", "method", "{}"),
    ("scheme", "scheme", "{}"),
    ("rotation", "rotation", "{}"),
    ("ppl", "perplexity", "{:.2f}"),
    ("act_bits", "A bits (mean)", "{:.2f}"),
    ("bits_storage", "bits/w (stored)", "{:.3f}"),
    ("bits_entropy", "bits/w (entropy)", "{:.3f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("output_error", "mean rel. E_x", "{:.4f}"),
    ("quant_seconds", "quant s", "{:.1f}"),
    ("eval_seconds", "eval s", "{:.1f}"),
]


def _tasks(rows: list[MethodRow]) -> dict[str, str]:
    """Task name → headline metric, over every row's accuracy, in order of appearance."""
    return {task: acc["metric"] for row in rows for task, acc in (row.accuracy or {}).items()}


def _accuracy_cell(row: MethodRow, task: str) -> str:
    acc = (row.accuracy or {}).get(task)
    if acc is None:
        return "–"
    return f"{acc['mean']:.3f}" + (f" ± {acc['std']:.3f}" if acc["seeds"] > 1 else "")


def markdown_table(rows: list[MethodRow]) -> str:
    """The main table; after the perplexity, one column per built-in task's accuracy."""
    tasks = _tasks(rows)
    titles = [title for _, title, _ in COLUMNS]
    at = titles.index("perplexity") + 1
    titles[at:at] = [f"{task} {metric}" for task, metric in tasks.items()]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    for row in rows:
        cells = [ppl_cell(row) if key == "ppl" else cell(getattr(row, key), fmt) for key, _, fmt in COLUMNS]
        cells[at:at] = [_accuracy_cell(row, task) for task in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_table(rows: list[MethodRow], prompts: tuple[str, ...]) -> str:
    """Each prompt with every model's continuation."""
    lines = []
    for k, prompt in enumerate(prompts):
        lines += [f"**{prompt}** …", "", "| method | continuation |", "|---|---|"]
        for row in rows:
            if row.samples:
                text = " ".join(row.samples[k].split()).replace("|", "\\|")
                lines.append(f"| {row.method} | {text} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def markdown_report(setup: dict, rows: list[MethodRow]) -> str:
    parts = [
        f"# twla bench: {setup['model']}",
        f"Evaluation: {setup['evaluation']}. Calibration: {setup['calibration']}. Device {setup['device']}.",
        f"Bit accounting: {setup['accounting']}",
        markdown_table(rows),
    ]
    if setup.get("task_setup"):
        parts.append(f"Zero-shot accuracy: {setup['task_setup']}")
    if len(setup["seeds"]) > 1:
        parts += [
            f"## Perplexity per seed (calibration windows and random choices; {len(setup['seeds'])} seeds)",
            seed_table(rows),
        ]
    parts += [
        "## Perplexity against stored bits per weight (★: Pareto front per activation bit-width)",
        frontier_table(rows),
    ]
    ablation = ablation_table(rows)
    if ablation:
        parts += ["## Ablation: each change between two benched methods (perplexity means over seeds)", ablation]
    parts += [
        "## Stages of the block fit (per-layer means, in each block's metric)",
        stage_table(rows),
    ]
    if any(row.reconstruction for row in rows):
        parts += [
            "## Block-wise reconstruction (held-out calibration windows; relative to each block's "
            "full-precision output change)",
            reconstruction_table(rows),
        ]
    if any(row.end_to_end for row in rows):
        parts += [
            "## End-to-end reconstruction (held-out calibration windows; mean KL from the full-precision "
            "model over its top tokens and the rest, nats per compared position)",
            reconstruction_table(rows, "end_to_end"),
        ]
    if any(row.shaping for row in rows):
        parts += ["## Rotations: tri-modality of the rotated weights (means over layers)", shaping_table(rows)]
    if any(sh.get("errors") for row in rows for sh in (row.shaping or {}).values()):
        parts += [
            "## Learned rotations against their fixed start (relative output errors of ternary weights and "
            "quantized activations, means over layers)",
            rotation_choice_table(rows),
        ]
    if any(row.relocation or row.activations for row in rows):
        parts += [
            "## Relocation and activations (relative output errors, per-layer means)",
            activation_table(rows),
        ]
    if any(row.weight_allocation for row in rows):
        metric = next(row.weight_allocation["metric"] for row in rows if row.weight_allocation)
        parts += [
            f"## Mixed-precision weights: Δ = {metric} change vs the full-precision model, on calibration tokens",
            weight_allocation_table(rows),
        ]
    if any(row.allocation for row in rows):
        metric = next(row.allocation["metric"] for row in rows if row.allocation)
        parts += [
            f"## Mixed-precision activations (ILA-AMP): Δ = {metric} change vs all-8-bit activations, "
            "on calibration tokens",
            allocation_table(rows),
        ]
    if any(row.packed for row in rows):
        parts += ["## Packed checkpoints (saved, loaded back and evaluated)", packed_table(rows)]
    if any(row.pipeline for row in rows):
        parts += [
            "## Where the time and memory go (first seed; the process's resident memory after each stage, "
            "and its peak so far)",
            pipeline_table(rows),
        ]
    if speed_table(rows):
        parts += ["## Speed on the CPU (batch 1, this machine, one run)", speed_table(rows)]
    if any(row.samples for row in rows):
        parts += [
            f"## Continuations (greedy, {REPORT_TOKENS} new tokens, first seed)",
            samples_table(rows, REPORT_PROMPTS),
        ]
    return "\n\n".join(parts)


def report_dict(setup: dict, rows: list[MethodRow]) -> dict:
    """The JSON form of a report (what report.json holds)."""
    return {"format": REPORT_FORMAT, "setup": setup, "rows": [asdict(row) for row in rows]}


def write_report(out_dir: str, setup: dict, rows: list[MethodRow]) -> str:
    """Write report.json and report.md into ``out_dir``; return the Markdown text."""
    text = markdown_report(setup, rows)
    write_json(os.path.join(out_dir, "report.json"), report_dict(setup, rows))
    write_text(os.path.join(out_dir, "report.md"), text + "\n")
    return text
