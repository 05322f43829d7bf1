"""Plots of a bench report, drawn on :class:`matplotlib.figure.Figure` objects (no pyplot,
no global backend) and written atomically as PNG files."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from twla.bench.rows import MethodRow
from twla.io import atomic_write


def _save_figure(fig: Figure, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))


def plot_layer_errors(rows: list[MethodRow], path: str) -> None:
    """Relative output error of every quantized linear layer, in execution order, per method."""
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    for row in rows:
        layers = row.layers
        if layers:
            ax.semilogy([rec["output_error"] for rec in layers], label=row.method, lw=1)
    ax.set_xlabel("linear layer (execution order)")
    ax.set_ylabel("relative output error tr(ESEᵀ)/tr(WSWᵀ)")
    ax.set_title("Per-layer output error on calibration data")
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def plot_frontier(rows: list[MethodRow], path: str) -> None:
    """Perplexity (log) against stored bits per weight: one colour per activation bit-width,
    filled markers for ternary weights, open ones for integer weights, bars for the seed spread."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    levels = sorted({row.act_bits for row in rows if row.method != "fp"}, reverse=True)
    for row in rows:
        if row.method == "fp":
            ax.axhline(row.ppl, color="k", ls="--", lw=0.8, label=f"full precision ({row.ppl:.2f})")
            continue
        color = f"C{levels.index(row.act_bits)}"
        ternary = row.scheme.startswith("W1.58")
        spread = row.ppl_spread
        ax.errorbar(
            row.bits_storage,
            row.ppl,
            yerr=spread["std"] if spread and spread["n"] > 1 else None,
            fmt="o" if ternary else "s",
            color=color,
            mfc=color if ternary else "none",
            capsize=2,
        )
        ax.annotate(row.method, (row.bits_storage, row.ppl), fontsize=6, xytext=(4, 2), textcoords="offset points")
    for level in levels:
        ax.plot([], [], "o", color=f"C{levels.index(level)}", label=f"A{level:g}")
    ax.plot([], [], "o", color="0.4", label="ternary (filled)")
    ax.plot([], [], "s", color="0.4", mfc="none", label="integer (open)")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per quantized weight")
    ax.set_ylabel("perplexity")
    ax.set_title("Quality against stored bits (mean over seeds; bars: standard deviation)")
    ax.legend(fontsize=7)
    _save_figure(fig, path)


def plot_weight_histograms(name: str, original: torch.Tensor, quantized: dict[str, torch.Tensor], *, path: str) -> None:
    """Histogram of one layer's weights before and after each method."""
    fig = Figure(figsize=(3.2 * (1 + len(quantized)), 2.8))
    axes = fig.subplots(1, 1 + len(quantized), sharey=True)
    lim = float(original.abs().max())
    for ax, (label, w) in zip(axes, [("full precision", original), *quantized.items()], strict=True):
        ax.hist(w.flatten().float().clamp(-lim, lim).numpy(), bins=121, range=(-lim, lim), log=True)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"weights of {name}", fontsize=10)
    _save_figure(fig, path)


def _row_normalized(W: torch.Tensor) -> torch.Tensor:
    """(w_ij − mean_j w_ij) / mean_j |w_ij − mean|: rows on the scale of the tri-modal centres ±1."""
    Z = W - W.mean(dim=1, keepdim=True)
    return (Z / Z.abs().mean(dim=1, keepdim=True).clamp(min=1e-12)).flatten()


def plot_rotation_histograms(weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], path: str) -> None:
    """Per rotated method and site: row-normalized weights of the middle layer before/after rotation."""
    methods = list(weights)
    sites = list(next(iter(weights.values())))
    fig = Figure(figsize=(3.2 * len(sites), 2.4 * len(methods)))
    axes = fig.subplots(len(methods), len(sites), squeeze=False)
    for r, method in enumerate(methods):
        for c, site in enumerate(sites):
            before, after = weights[method][site]
            ax = axes[r][c]
            for label, W, color in (("original", before, "0.6"), ("rotated", after, "C0")):
                ax.hist(
                    _row_normalized(W.float()).numpy(),
                    bins=161,
                    range=(-4, 4),
                    density=True,
                    histtype="step",
                    color=color,
                    label=label,
                )
            ax.set_title(f"{method}\n{site}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("middle layer, weights per row divided by their mean |w|: before and after rotation", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_allocations(rows: list[MethodRow], path: str) -> None:
    """Per mixed-precision method: the bits chosen per unit (top) and the measured unary costs."""
    mixed = [row for row in rows if row.allocation]
    fig = Figure(figsize=(6 * len(mixed), 5.5))
    axes = fig.subplots(2, len(mixed), squeeze=False)
    for c, row in enumerate(mixed):
        al = row.allocation
        bits = al["allocation"]["bits"]
        axes[0][c].bar(range(len(bits)), bits, width=1.0, color="C0", edgecolor="white", lw=0.3)
        axes[0][c].axhline(al["allocation"]["mean_bits"], color="C3", lw=1, label="realized mean")
        axes[0][c].set_yticks(al["costs"]["bits"])
        axes[0][c].set_title(f"{row.method}: bits per {al['granularity']}", fontsize=9)
        axes[0][c].legend(fontsize=7)
        unary = al["costs"]["unary"]
        for k, b in enumerate(al["costs"]["bits"]):
            values = [max(u[k], 1e-9) for u in unary]
            if any(u[k] for u in unary):
                axes[1][c].semilogy(values, label=f"{b} bits", lw=1)
        axes[1][c].set_xlabel(f"{al['granularity']} (execution order)")
        axes[1][c].set_ylabel(f"measured unary cost ({al['metric']})")
        axes[1][c].legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_cost_predictions(rows: list[MethodRow], path: str) -> None:
    """Left: second-order (Fisher) estimate vs measured unary costs (rows whose costs were
    measured). Right: predicted (Σs + Σc) vs measured change of the mixed and the uniform models."""
    mixed = [row for row in rows if row.allocation]
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    lo, hi = float("inf"), 0.0
    for i, row in enumerate(mixed):
        al = row.allocation
        compared = al["agreement"] is not None  # the estimate beside measured costs
        pairs = [
            (e, m)
            for est_row, meas_row in zip(al["estimate"] if compared else [], al["costs"]["unary"], strict=False)
            for e, m in zip(est_row, meas_row, strict=True)
            if e > 0 and m > 0
        ]
        if pairs:
            est, meas = zip(*pairs, strict=True)
            left.loglog(est, meas, ".", ms=3, alpha=0.6, color=f"C{i}", label=row.method)
            lo, hi = min(lo, *est, *meas), max(hi, *est, *meas)
        for key, marker in (("mixed", "o"), ("uniform", "s")):
            point = al if key == "mixed" else al["uniform"]
            if point:
                right.plot(point["predicted"], point["measured"], marker, color=f"C{i}", label=f"{row.method} {key}")
    if hi > 0:
        left.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    left.set_xlabel("Fisher estimate ½ΣFΔ²/12")
    left.set_ylabel("measured unary cost")
    left.legend(fontsize=7)
    right.axline((0, 0), slope=1, color="k", ls="--", lw=0.8)
    right.set_xlabel("predicted Σs + Σc")
    right.set_ylabel("measured change")
    right.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
