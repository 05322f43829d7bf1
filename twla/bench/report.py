"""Bench reports: one typed row per method, rendered as Markdown tables and written with the
run's setup as JSON, atomically (plots: :mod:`twla.bench.plots`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from twla.evaluate.generation import REPORT_PROMPTS, REPORT_TOKENS
from twla.io import write_json, write_text
from twla.quantization.methods import method_parts

REPORT_FORMAT = "twla-bench-report"  # marks report.json, so a later run knows the directory is its own


@dataclass
class MethodRow:
    """One method of a bench run: perplexity (the mean over seeds), bits and sizes, seconds, and
    the details the first seed's model measured (JSON forms of the pipeline's reports).

    ppl_spread: mean, std, min, max, n over seeds; seeds: {seed: {"ppl", "quant_seconds"}}.
    output_error: mean relative output error over linears; stages: per stage of the block fit,
    mean weight / output error; relocation, activations: means of the per-layer records;
    reconstruction: per-block errors before / after; end_to_end: held-out mean KL before / after
    the end-to-end reconstruction; shaping: per-site rotation scores;
    allocation: ILA-AMP costs and choice; bits: the bit accounting; config: the QuantConfig
    dict; layers: per-layer records; packed: the saved checkpoint, reloaded and evaluated;
    accuracy: per built-in task, its headline metric (mean and std over seeds, the first seed's
    items, binomial standard error and every metric; :mod:`twla.evaluate.tasks`); samples: the first
    seed's greedy continuations of :data:`twla.evaluate.generation.REPORT_PROMPTS`.
    """

    method: str
    scheme: str
    rotation: str
    ppl: float
    act_bits: float
    bits_storage: float
    bits_entropy: float
    size_mb: float
    eval_seconds: float
    output_error: float | None = None
    quant_seconds: float | None = None
    rotation_seconds: float | None = None
    ppl_spread: dict | None = None
    seeds: dict[int, dict] = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    relocation: dict | None = None
    activations: dict | None = None
    reconstruction: dict | None = None
    end_to_end: dict | None = None
    shaping: dict | None = None
    allocation: dict | None = None
    bits: dict | None = None
    config: dict | None = None
    layers: list[dict] = field(default_factory=list)
    packed: dict | None = None
    accuracy: dict[str, dict] | None = None
    samples: list[str] | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> MethodRow:
        """The row of a report.json (seed keys back to integers)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"report row: unknown fields {', '.join(unknown)}")
        return cls(**{**data, "seeds": {int(k): v for k, v in data.get("seeds", {}).items()}})


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


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 1e5 and fmt.startswith("{:."):
        return f"{value:.3g}"
    return fmt.format(value)


def _ppl_cell(row: MethodRow) -> str:
    """The perplexity, as mean ± sample standard deviation when the method ran with several seeds."""
    spread = row.ppl_spread
    if spread and spread["n"] > 1:
        return f"{_cell(spread['mean'], '{:.2f}')} ± {_cell(spread['std'], '{:.2f}')}"
    return _cell(row.ppl, "{:.2f}")


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
        cells = [_ppl_cell(row) if key == "ppl" else _cell(getattr(row, key), fmt) for key, _, fmt in COLUMNS]
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


def seed_table(rows: list[MethodRow]) -> str:
    """Perplexity of every method under every seed, with mean, spread and range."""
    seeds = sorted({s for row in rows for s in row.seeds})
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min–max |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for row in rows:
        if row.seeds:
            by_seed = {k: v["ppl"] for k, v in row.seeds.items()}
            sp = row.ppl_spread
            cells = [_cell(by_seed.get(s), "{:.2f}") for s in seeds]
            lines.append(
                f"| {row.method} | {' | '.join(cells)} | {_cell(sp['mean'], '{:.2f}')} | "
                f"{_cell(sp['std'], '{:.2f}')} | {_cell(sp['min'], '{:.2f}')}–{_cell(sp['max'], '{:.2f}')} |"
            )
    return "\n".join(lines)


def reconstruction_table(rows: list[MethodRow], field: str = "reconstruction") -> str:
    """Held-out error before and after a reconstruction: ``reconstruction`` (block-wise, the
    relative block output error, means over blocks) or ``end_to_end`` (the mean KL divergence
    from the full-precision model per compared position)."""
    label = "KL" if field == "end_to_end" else "block error"
    lines = [f"| method | {label} before | after | change | steps | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        rc = getattr(row, field)
        if rc:
            change = 100 * (rc["after"] / rc["before"] - 1) if rc["before"] else 0.0
            lines.append(
                f"| {row.method} | {rc['before']:.4f} | {rc['after']:.4f} | {change:+.1f} % "
                f"| {rc['steps']:.0f} | {rc['seconds']:.0f} |"
            )
    return "\n".join(lines)


def _std_error(row: MethodRow) -> float | None:
    """Standard error of the mean perplexity over seeds (None for one seed)."""
    spread = row.ppl_spread
    return spread["std"] / spread["n"] ** 0.5 if spread and spread["n"] > 1 else None


def ablation_pairs(rows: list[MethodRow]) -> list[tuple[MethodRow, MethodRow, str]]:
    """(without, with, what changed) for every two benched methods one step apart: the same base
    and a smallest set of added modifiers (no benched method in between), or the same modifiers
    on another base (listed once, in row order)."""
    methods = [row for row in rows if row.method != "fp"]
    parts = [method_parts(row.method) for row in methods]
    pairs = []
    for i, (a, (base_a, mods_a)) in enumerate(zip(methods, parts, strict=True)):
        for j, (b, (base_b, mods_b)) in enumerate(zip(methods, parts, strict=True)):
            if base_a == base_b and mods_a < mods_b:
                if not any(base == base_a and mods_a < mods < mods_b for base, mods in parts):
                    added = [m for m in b.method.split("+")[1:] if m not in mods_a]
                    pairs.append((a, b, "+" + "+".join(added)))
            elif i < j and base_a != base_b and mods_a == mods_b:
                pairs.append((a, b, f"{base_b} instead of {base_a}"))
    return pairs


def ablation_table(rows: list[MethodRow]) -> str:
    """Perplexity with and without each component (means over seeds); Δ in standard errors of
    the difference when both sides ran with several seeds. Empty when no two rows pair up."""
    pairs = ablation_pairs(rows)
    if not pairs:
        return ""
    lines = [
        "| change | from | perplexity without | with | Δ | Δ / s.e. |",
        "|---|---|---|---|---|---|",
    ]
    for a, b, change in pairs:
        delta = b.ppl - a.ppl
        errors = (_std_error(a), _std_error(b))
        z = "–" if None in errors else f"{delta / max((errors[0] ** 2 + errors[1] ** 2) ** 0.5, 1e-12):+.1f}"
        lines.append(f"| {change} | {a.method} | {_ppl_cell(a)} | {_ppl_cell(b)} | {delta:+.2f} | {z} |")
    return "\n".join(lines)


def frontier_points(rows: list[MethodRow]) -> list[tuple[MethodRow, bool]]:
    """Every row with whether it is Pareto-optimal among the rows at its activation bits: no
    other row stores at most as many bits per weight with a lower perplexity."""
    points = sorted(rows, key=lambda r: (-r.act_bits, r.bits_storage, r.ppl))
    return [
        (
            row,
            not any(
                other is not row
                and other.act_bits == row.act_bits
                and other.bits_storage <= row.bits_storage
                and other.ppl < row.ppl
                for other in rows
            ),
        )
        for row in points
    ]


def frontier_table(rows: list[MethodRow]) -> str:
    """Perplexity against stored bits per weight, per activation bit-width; ★ marks the Pareto front."""
    lines = ["| activations | bits/w (stored) | method | perplexity | front |", "|---|---|---|---|---|"]
    for row, optimal in frontier_points(rows):
        lines.append(
            f"| A{row.act_bits:g} | {row.bits_storage:.3f} | {row.method} | {_ppl_cell(row)} "
            f"| {'★' if optimal else ''} |"
        )
    return "\n".join(lines)


def stage_table(rows: list[MethodRow]) -> str:
    """Mean relative weight / output error after each stage of each method's block fit."""
    lines = ["| method | stage | mean rel. E_w | mean rel. E_x |", "|---|---|---|---|"]
    for row in rows:
        for stage, err in row.stages.items():
            lines.append(f"| {row.method} | {stage} | {err['weight_error']:.4f} | {err['output_error']:.4f} |")
    return "\n".join(lines)


def shaping_table(rows: list[MethodRow]) -> str:
    """Tri-modality of the rotated weights per site (means over layers): before → after."""
    lines = [
        "| method | site | factors | ternary fit error | zero codes | loss (first → last) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for site, sh in (row.shaping or {}).items():
            fit = f"{_avg(sh['fit_error_before']):.4f} → {_avg(sh['fit_error_after']):.4f}"
            zero = f"{_avg(sh['zero_fraction_before']):.3f} → {_avg(sh['zero_fraction_after']):.3f}"
            loss = f"{sh['losses'][0]:.4f} → {sh['losses'][-1]:.4f}" if sh["losses"] else "fixed"
            factors = "⊗".join(map(str, sh["factors"]))
            lines.append(f"| {row.method} | {site} | {factors} | {fit} | {zero} | {loss} | {sh['seconds']:.1f} |")
    return "\n".join(lines)


def rotation_choice_table(rows: list[MethodRow]) -> str:
    """Learned against fixed site rotations: per site, how many layers kept the learned one, and
    both rotations' output errors (means over layers, calibration inputs the solver did not see)."""
    lines = [
        "| method | site | learned kept | weight error fixed → learned | activation error | combined error | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for site, sh in (row.shaping or {}).items():
            errors = sh.get("errors")
            if not errors:
                continue
            fixed, learned = errors["fixed"], errors["learned"]
            cells = [f"{_avg(fixed[k]):.4f} → {_avg(learned[k]):.4f}" for k in ("weight", "activation", "combined")]
            kept = [
                b if keep else a
                for a, b, keep in zip(fixed["combined"], learned["combined"], sh["learned"], strict=True)
            ]
            count = f"{sum(sh['learned'])} of {len(sh['learned'])}"
            lines.append(f"| {row.method} | {site} | {count} | {' | '.join(cells)} | {_avg(kept):.4f} |")
    return "\n".join(lines)


def activation_table(rows: list[MethodRow]) -> str:
    """Relocation objective and activation-quantization error (per-layer means)."""
    lines = [
        "| method | relocation objective (before → after) | act. output error, p = 1 | calibrated p | mean p |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        reloc, acts = row.relocation, row.activations
        if not (reloc or acts):
            continue
        r = f"{reloc['before']:.4f} → {reloc['after']:.4f}" if reloc else "–"
        a = [f"{acts[k]:.4f}" if acts else "–" for k in ("clip=1", "calibrated")]
        p = f"{acts['mean_clip']:.3f}" if acts else "–"
        lines.append(f"| {row.method} | {r} | {a[0]} | {a[1]} | {p} |")
    return "\n".join(lines)


def allocation_table(rows: list[MethodRow]) -> str:
    """ILA-AMP: the chosen bits, and the cost model's prediction against the measured change."""
    lines = [
        "| method | units | solver | mean bits (budget) | units per bit-width | predicted Δ (mixed) "
        "| measured Δ (mixed) | predicted Δ (uniform) | measured Δ (uniform) "
        "| Fisher vs measured s: Spearman, median ratio | cost passes, s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        al = row.allocation
        if not al:
            continue
        choice, uniform, agree = al["allocation"], al["uniform"] or {}, al["agreement"]
        counts = ", ".join(f"{b}: {choice['bits'].count(b)}" for b in al["costs"]["bits"])
        uni = [f"{uniform[k]:.4f}" if uniform else "–" for k in ("predicted", "measured")]
        lines.append(
            f"| {row.method} | {len(al['units'])} {al['granularity']}s | {choice['solver']} "
            f"| {choice['mean_bits']:.2f} ({choice['budget']:g}) | {counts} | {al['predicted']:.4f} "
            f"| {al['measured']:.4f} | {uni[0]} | {uni[1]} | {agree['spearman']:.2f}, {agree['median_ratio']:.2f} "
            f"| {al['passes']}, {al['seconds']:.0f} |"
        )
    return "\n".join(lines)


def packed_table(rows: list[MethodRow]) -> str:
    """Saved packed checkpoints (the first seed's model), reloaded from disk: sizes from the files;
    perplexity next to that of the fake-quantized model they were packed from."""
    lines = [
        "| method | checkpoint | bits/w (file) | tensor file MiB | fp16 MiB | ratio | perplexity (fake-quant) "
        "| perplexity (packed, reloaded) | eval s (packed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pk = row.packed
        if pk:
            lines.append(
                f"| {row.method} | {pk['path']} | {pk['bits_per_weight']:.3f} | {pk['file_bytes'] / 2**20:.1f} "
                f"| {pk['fp16_bytes'] / 2**20:.1f} | {pk['fp16_bytes'] / pk['file_bytes']:.2f}× "
                f"| {pk['fake_quant_ppl']:.4f} | {pk['ppl']:.4f} | {pk['eval_seconds']:.1f} |"
            )
    return "\n".join(lines)


def _avg(values: list[float]) -> float:
    return sum(values) / len(values)


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
            "model, nats per position)",
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
    if any(row.allocation for row in rows):
        metric = next(row.allocation["metric"] for row in rows if row.allocation)
        parts += [
            f"## Mixed-precision activations (ILA-AMP): Δ = {metric} change vs all-8-bit activations, "
            "on calibration tokens",
            allocation_table(rows),
        ]
    if any(row.packed for row in rows):
        parts += ["## Packed checkpoints (2-bit codes; saved, loaded back and evaluated)", packed_table(rows)]
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
