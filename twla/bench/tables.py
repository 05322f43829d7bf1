"""The report's detailed tables: seeds, ablation pairs, the quality-vs-bits frontier, stages of the
block fit, reconstruction, rotations, activations, bit allocation, packed checkpoints."""

from __future__ import annotations

from twla.bench.rows import MethodRow, cell, ppl_cell, spread
from twla.quantization.methods import method_parts


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
            cells = [cell(by_seed.get(s), "{:.2f}") for s in seeds]
            lines.append(
                f"| {row.method} | {' | '.join(cells)} | {cell(sp['mean'], '{:.2f}')} | "
                f"{cell(sp['std'], '{:.2f}')} | {cell(sp['min'], '{:.2f}')}–{cell(sp['max'], '{:.2f}')} |"
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
        lines.append(f"| {change} | {a.method} | {ppl_cell(a)} | {ppl_cell(b)} | {delta:+.2f} | {z} |")
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
            f"| A{row.act_bits:g} | {row.bits_storage:.3f} | {row.method} | {ppl_cell(row)} "
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


def pipeline_table(rows: list[MethodRow]) -> str:
    """Where each method's time and memory go (first seed): per stage, its calls and seconds, the
    process's resident memory after it and its peak so far (MiB; the whole run's, so a later row
    starts from the peaks of the rows before it)."""
    lines = ["| method | stage | calls | seconds | resident MiB after | peak MiB so far |", "|---|---|---|---|---|---|"]
    for row in rows:
        for stage, e in row.pipeline.items():
            cells = [cell(e.get(k), f) for k, f in (("resident_mb", "{:.0f}"), ("peak_mb", "{:.0f}"))]
            lines.append(f"| {row.method} | {stage} | {e['calls']} | {e['seconds']:.1f} | {' | '.join(cells)} |")
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


def weight_allocation_table(rows: list[MethodRow]) -> str:
    """Mixed-precision weights: the formats chosen per linear type, and the cost model's prediction
    against the measured change (every linear at its format's uncompensated candidate at once)."""
    lines = [
        "| method | solver | stored bits/w (budget) | linears per format | by linear: format counts "
        "| predicted Δ (mixed) | measured Δ (mixed) | measured Δ (all ternary) | cost passes, s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        wa = row.weight_allocation
        if not wa:
            continue
        kinds: dict[str, dict[str, int]] = {}
        for name, option in wa["formats"].items():
            counts = kinds.setdefault(name.rsplit(".", 1)[-1], {})
            counts[option] = counts.get(option, 0) + 1
        by_kind = "; ".join(
            f"{kind} " + ", ".join(f"{o} {n}" for o, n in counts.items()) for kind, counts in kinds.items()
        )
        per_format = ", ".join(f"{o}: {n}" for o, n in wa["counts"].items())
        ternary = f"{wa['ternary']['measured']:.4f}" if wa["ternary"] else "–"
        lines.append(
            f"| {row.method} | {wa['allocation']['solver']} | {wa['stored_bits']:.3f} ({wa['budget']:g}) "
            f"| {per_format} | {by_kind} | {wa['predicted']:.4f} | {wa['measured']:.4f} | {ternary} "
            f"| {wa['passes']}, {wa['seconds']:.0f} |"
        )
    return "\n".join(lines)


def _against_uniform(row: MethodRow) -> str:
    """Perplexity with the allocation's bits and with every linear at the budget's bits, the same
    quantized model: means over seeds and the paired difference (± its standard error)."""
    pairs = [(s["ppl"], s["uniform_ppl"]) for s in row.seeds.values() if "uniform_ppl" in s]
    if not pairs:
        return "–"
    chosen, uniform, diff = (spread(list(v)) for v in (*zip(*pairs, strict=True), [a - b for a, b in pairs]))
    n = diff["n"]
    error = f" ± {diff['std'] / n**0.5:.3f} s.e., {n} seeds" if n > 1 else ""
    return f"{chosen['mean']:.3f}, {uniform['mean']:.3f} ({diff['mean']:+.3f}{error})"


def allocation_table(rows: list[MethodRow]) -> str:
    """ILA-AMP: where its costs came from, the chosen bits, the cost model's prediction against the
    measured change, and the bits set (the program's, or uniform ones that measured no worse)."""
    lines = [
        "| method | units | costs | solver | mean bits (budget) | units per bit-width | predicted Δ (mixed) "
        "| measured Δ (mixed) | predicted Δ (uniform) | measured Δ (uniform) | bits set "
        "| Fisher vs measured s: Spearman, median ratio | cost passes, s | perplexity: bits set, uniform (Δ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        al = row.allocation
        if not al:
            continue
        choice, uniform, agree = al["allocation"], al["uniform"] or {}, al["agreement"]
        counts = ", ".join(f"{b}: {choice['bits'].count(b)}" for b in al["costs"]["bits"])
        uni = [f"{uniform[k]:.4f}" if uniform else "–" for k in ("predicted", "measured")]
        agreement = f"{agree['spearman']:.2f}, {agree['median_ratio']:.2f}" if agree else "–"
        lines.append(
            f"| {row.method} | {len(al['units'])} {al['granularity']}s | {al.get('cost_source', 'measured')} "
            f"| {choice['solver']} "
            f"| {choice['mean_bits']:.2f} ({choice['budget']:g}) | {counts} | {al['predicted']:.4f} "
            f"| {al['measured']:.4f} | {uni[0]} | {uni[1]} | {'uniform' if al['kept_uniform'] else 'mixed'} "
            f"| {agreement} | {al['passes']}, {al['seconds']:.0f} | {_against_uniform(row)} |"
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


def speed_table(rows: list[MethodRow]) -> str:
    """Batch-1 speed on the CPU: full precision in float32 and bfloat16, and each saved checkpoint as
    loaded (CPU kernel layout); prefill of 512 tokens, greedy decode, the weights' memory."""
    measured = [(v, s) for v, s in (rows[0].speed or {}).items()]
    measured += [
        (f"{row.method} (packed)", row.packed["speed"]) for row in rows if row.packed and "speed" in row.packed
    ]
    if not measured:
        return ""
    base = measured[0][1]
    lines = [
        "| model | prefill 512 s | decode tokens/s | weights MiB | prefill vs fp32 | decode vs fp32 | memory vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in measured:
        lines.append(
            f"| {label} | {s['prefill_s']:.2f} | {s['tokens_per_s']:.1f} | {s['weight_mib']:.1f} "
            f"| {s['prefill_s'] / base['prefill_s']:.2f}× | {s['tokens_per_s'] / base['tokens_per_s']:.2f}× "
            f"| {s['weight_mib'] / base['weight_mib']:.3f} |"
        )
    return "\n".join(lines)


def _avg(values: list[float]) -> float:
    return sum(values) / len(values)
