"""Bench reports: Markdown tables and the JSON file, written atomically (plots: :mod:`twla.plots`)."""

from __future__ import annotations

import os

from twla.config import method_parts
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


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 1e5 and fmt.startswith("{:."):
        return f"{value:.3g}"
    return fmt.format(value)


def _ppl_cell(row: dict) -> str:
    """The perplexity, as mean ± sample standard deviation when the method ran with several seeds."""
    spread = row.get("ppl_spread")
    if spread and spread["n"] > 1:
        return f"{_cell(spread['mean'], '{:.2f}')} ± {_cell(spread['std'], '{:.2f}')}"
    return _cell(row.get("ppl"), "{:.2f}")


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = [
        "| "
        + " | ".join(_ppl_cell(row) if key == "ppl" else _cell(row.get(key), fmt) for key, _, fmt in COLUMNS)
        + " |"
        for row in rows
    ]
    return "\n".join([head, rule, *body])


def seed_table(rows: list[dict]) -> str:
    """Perplexity of every method under every seed, with mean, spread and range."""
    seeds = sorted({int(s) for row in rows for s in row.get("seeds", {})})
    lines = [
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min–max |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    for row in rows:
        if row.get("seeds"):
            by_seed = {int(k): v["ppl"] for k, v in row["seeds"].items()}
            sp = row["ppl_spread"]
            cells = [_cell(by_seed.get(s), "{:.2f}") for s in seeds]
            lines.append(
                f"| {row['method']} | {' | '.join(cells)} | {_cell(sp['mean'], '{:.2f}')} | "
                f"{_cell(sp['std'], '{:.2f}')} | {_cell(sp['min'], '{:.2f}')}–{_cell(sp['max'], '{:.2f}')} |"
            )
    return "\n".join(lines)


def reconstruction_table(rows: list[dict]) -> str:
    """Block-wise reconstruction: held-out relative block output error before and after (means over blocks)."""
    lines = [
        "| method | block error before | after | change | mean steps | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        rc = row.get("reconstruction")
        if rc:
            change = 100 * (rc["after"] / rc["before"] - 1) if rc["before"] else 0.0
            lines.append(
                f"| {row['method']} | {rc['before']:.4f} | {rc['after']:.4f} | {change:+.1f} % "
                f"| {rc['steps']:.0f} | {rc['seconds']:.0f} |"
            )
    return "\n".join(lines)


def _std_error(row: dict) -> float | None:
    """Standard error of the mean perplexity over seeds (None for one seed)."""
    spread = row.get("ppl_spread")
    return spread["std"] / spread["n"] ** 0.5 if spread and spread["n"] > 1 else None


def ablation_pairs(rows: list[dict]) -> list[tuple[dict, dict, str]]:
    """(without, with, what changed) for every two benched methods one step apart: the same base
    and a smallest set of added modifiers (no benched method in between), or the same modifiers
    on another base (listed once, in row order)."""
    methods = [row for row in rows if row["method"] != "fp"]
    parts = [method_parts(row["method"]) for row in methods]
    pairs = []
    for i, (a, (base_a, mods_a)) in enumerate(zip(methods, parts)):
        for j, (b, (base_b, mods_b)) in enumerate(zip(methods, parts)):
            if base_a == base_b and mods_a < mods_b:
                if not any(base == base_a and mods_a < mods < mods_b for base, mods in parts):
                    added = [m for m in b["method"].split("+")[1:] if m not in mods_a]
                    pairs.append((a, b, "+" + "+".join(added)))
            elif i < j and base_a != base_b and mods_a == mods_b:
                pairs.append((a, b, f"{base_b} instead of {base_a}"))
    return pairs


def ablation_table(rows: list[dict]) -> str:
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
        delta = b["ppl"] - a["ppl"]
        errors = (_std_error(a), _std_error(b))
        z = "–" if None in errors else f"{delta / max((errors[0] ** 2 + errors[1] ** 2) ** 0.5, 1e-12):+.1f}"
        lines.append(f"| {change} | {a['method']} | {_ppl_cell(a)} | {_ppl_cell(b)} | {delta:+.2f} | {z} |")
    return "\n".join(lines)


def frontier_points(rows: list[dict]) -> list[tuple[dict, bool]]:
    """Every row with whether it is Pareto-optimal among the rows at its activation bits: no
    other row stores at most as many bits per weight with a lower perplexity."""
    points = sorted(rows, key=lambda r: (-r["act_bits"], r["bits_storage"], r["ppl"]))
    return [
        (
            row,
            not any(
                other is not row
                and other["act_bits"] == row["act_bits"]
                and other["bits_storage"] <= row["bits_storage"]
                and other["ppl"] < row["ppl"]
                for other in rows
            ),
        )
        for row in points
    ]


def frontier_table(rows: list[dict]) -> str:
    """Perplexity against stored bits per weight, per activation bit-width; ★ marks the Pareto front."""
    lines = ["| activations | bits/w (stored) | method | perplexity | front |", "|---|---|---|---|---|"]
    for row, optimal in frontier_points(rows):
        lines.append(
            f"| A{row['act_bits']:g} | {row['bits_storage']:.3f} | {row['method']} | {_ppl_cell(row)} "
            f"| {'★' if optimal else ''} |"
        )
    return "\n".join(lines)


def stage_table(rows: list[dict]) -> str:
    """Mean relative weight / output error after each stage of each method's block fit."""
    lines = ["| method | stage | mean rel. E_w | mean rel. E_x |", "|---|---|---|---|"]
    for row in rows:
        for stage, err in row.get("stages", {}).items():
            lines.append(f"| {row['method']} | {stage} | {err['weight_error']:.4f} | {err['output_error']:.4f} |")
    return "\n".join(lines)


def shaping_table(rows: list[dict]) -> str:
    """Tri-modality of the rotated weights per site (means over layers): before → after."""
    lines = [
        "| method | site | factors | ternary fit error | zero codes | loss (first → last) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for site, sh in (row.get("shaping") or {}).items():
            fit = f"{_avg(sh['fit_error_before']):.4f} → {_avg(sh['fit_error_after']):.4f}"
            zero = f"{_avg(sh['zero_fraction_before']):.3f} → {_avg(sh['zero_fraction_after']):.3f}"
            loss = f"{sh['losses'][0]:.4f} → {sh['losses'][-1]:.4f}" if sh["losses"] else "fixed"
            factors = "⊗".join(map(str, sh["factors"]))
            lines.append(f"| {row['method']} | {site} | {factors} | {fit} | {zero} | {loss} | {sh['seconds']:.1f} |")
    return "\n".join(lines)


def activation_table(rows: list[dict]) -> str:
    """Relocation objective and activation-quantization error (per-layer means)."""
    lines = [
        "| method | relocation objective (before → after) | act. output error, p = 1 | calibrated p | mean p |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        reloc, acts = row.get("relocation"), row.get("activations")
        if not (reloc or acts):
            continue
        r = f"{reloc['before']:.4f} → {reloc['after']:.4f}" if reloc else "–"
        a = [f"{acts[k]:.4f}" if acts else "–" for k in ("clip=1", "calibrated")]
        p = f"{acts['mean_clip']:.3f}" if acts else "–"
        lines.append(f"| {row['method']} | {r} | {a[0]} | {a[1]} | {p} |")
    return "\n".join(lines)


def allocation_table(rows: list[dict]) -> str:
    """ILA-AMP: the chosen bits, and the cost model's prediction against the measured change."""
    lines = [
        "| method | units | solver | mean bits (budget) | units per bit-width | predicted Δ (mixed) "
        "| measured Δ (mixed) | predicted Δ (uniform) | measured Δ (uniform) "
        "| Fisher vs measured s: Spearman, median ratio | cost passes, s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        al = row.get("allocation")
        if not al:
            continue
        choice, uniform, agree = al["allocation"], al["uniform"] or {}, al["agreement"]
        counts = ", ".join(f"{b}: {choice['bits'].count(b)}" for b in al["costs"]["bits"])
        uni = [f"{uniform[k]:.4f}" if uniform else "–" for k in ("predicted", "measured")]
        lines.append(
            f"| {row['method']} | {len(al['units'])} {al['granularity']}s | {choice['solver']} "
            f"| {choice['mean_bits']:.2f} ({choice['budget']:g}) | {counts} | {al['predicted']:.4f} "
            f"| {al['measured']:.4f} | {uni[0]} | {uni[1]} | {agree['spearman']:.2f}, {agree['median_ratio']:.2f} "
            f"| {al['passes']}, {al['seconds']:.0f} |"
        )
    return "\n".join(lines)


def packed_table(rows: list[dict]) -> str:
    """Saved packed checkpoints (the first seed's model), reloaded from disk: sizes from the files;
    perplexity next to that of the fake-quantized model they were packed from."""
    lines = [
        "| method | checkpoint | bits/w (file) | tensor file MiB | fp16 MiB | ratio | perplexity (fake-quant) "
        "| perplexity (packed, reloaded) | eval s (packed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pk = row.get("packed")
        if pk:
            lines.append(
                f"| {row['method']} | {pk['path']} | {pk['bits_per_weight']:.3f} | {pk['file_bytes'] / 2**20:.1f} "
                f"| {pk['fp16_bytes'] / 2**20:.1f} | {pk['fp16_bytes'] / pk['file_bytes']:.2f}× "
                f"| {pk['fake_quant_ppl']:.4f} | {pk['ppl']:.4f} | {pk['eval_seconds']:.1f} |"
            )
    return "\n".join(lines)


def _avg(values: list[float]) -> float:
    return sum(values) / len(values)


def markdown_report(result: dict) -> str:
    setup = result["setup"]
    rows = result["rows"]
    parts = [
        f"# twla bench: {setup['model']}",
        f"Evaluation: {setup['evaluation']}. Calibration: {setup['calibration']}. Device {setup['device']}.",
        f"Bit accounting: {setup['accounting']}",
        markdown_table(rows),
    ]
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
    if any(row.get("reconstruction") for row in rows):
        parts += [
            "## Block-wise reconstruction (held-out calibration windows; relative to each block's "
            "full-precision output change)",
            reconstruction_table(rows),
        ]
    if any(row.get("shaping") for row in rows):
        parts += ["## Rotations: tri-modality of the rotated weights (means over layers)", shaping_table(rows)]
    if any(row.get("relocation") or row.get("activations") for row in rows):
        parts += [
            "## Relocation and activations (relative output errors, per-layer means)",
            activation_table(rows),
        ]
    if any(row.get("allocation") for row in rows):
        metric = next(row["allocation"]["metric"] for row in rows if row.get("allocation"))
        parts += [
            f"## Mixed-precision activations (ILA-AMP): Δ = {metric} change vs all-8-bit activations, "
            "on calibration tokens",
            allocation_table(rows),
        ]
    if any(row.get("packed") for row in rows):
        parts += ["## Packed checkpoints (2-bit codes; saved, loaded back and evaluated)", packed_table(rows)]
    return "\n\n".join(parts)


def write_report(out_dir: str, result: dict) -> str:
    """Write report.json and report.md into ``out_dir``; return the Markdown text."""
    text = markdown_report(result)
    write_json(os.path.join(out_dir, "report.json"), result)
    write_text(os.path.join(out_dir, "report.md"), text + "\n")
    return text
