"""One typed row per benched method: what the report's tables and plots are made of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

REPORT_FORMAT = "twla-bench-report"  # marks report.json, so a later run knows the directory is its own


@dataclass
class MethodRow:
    """One method of a bench run: perplexity (the mean over seeds), bits and sizes, seconds, and
    the details the first seed's model measured (JSON forms of the pipeline's reports).

    ppl_spread: mean, std, min, max, n over seeds; seeds: {seed: {"ppl", "quant_seconds", "accuracy"}},
    with "uniform_ppl" for an ILA-AMP row: the same model with every linear at the budget's bits.
    output_error: mean relative output error over linears; stages: per stage of the block fit,
    mean weight / output error; relocation, activations: means of the per-layer records;
    reconstruction: per-block errors before / after; end_to_end: held-out mean KL before / after
    the end-to-end reconstruction; shaping: per-site rotation scores; weight_allocation: the
    weight formats' costs and choice; allocation: ILA-AMP costs and choice; bits: the bit
    accounting; config: the QuantConfig dict; layers: per-layer records; packed: the saved
    checkpoint, reloaded and evaluated; pipeline: the first seed's time and memory per stage of
    the pipeline and of the bench (seconds, calls, resident and peak-so-far MiB after it);
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
    weight_allocation: dict | None = None
    allocation: dict | None = None
    bits: dict | None = None
    config: dict | None = None
    layers: list[dict] = field(default_factory=list)
    packed: dict | None = None
    accuracy: dict[str, dict] | None = None
    samples: list[str] | None = None
    speed: dict[str, dict] | None = None  # on the CPU: batch-1 prefill and decode of this model, by variant
    pipeline: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping) -> MethodRow:
        """The row of a report.json (seed keys back to integers)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"report row: unknown fields {', '.join(unknown)}")
        return cls(**{**data, "seeds": {int(k): v for k, v in data.get("seeds", {}).items()}})


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return {"mean": mean, "std": var**0.5, "min": min(values), "max": max(values), "n": len(values)}


def cell(value: object, fmt: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value >= 1e5 and fmt.startswith("{:."):
        return f"{value:.3g}"
    return fmt.format(value)


def ppl_cell(row: MethodRow) -> str:
    """The perplexity, as mean ± sample standard deviation when the method ran with several seeds."""
    spread = row.ppl_spread
    if spread and spread["n"] > 1:
        return f"{cell(spread['mean'], '{:.2f}')} ± {cell(spread['std'], '{:.2f}')}"
    return cell(row.ppl, "{:.2f}")
