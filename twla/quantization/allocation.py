"""ILA-AMP on a quantized model: measured costs, their second-order estimate, and the allocation.

Units ℓ (decoder blocks, or input sites) in execution order choose activation bits b_ℓ
. On fixed calibration tokens, with every unit at the reference bits b_ref:

    s_ℓ(b)     = M(ℓ:b) − M_ref,
    c_ℓ(b, b') = M(ℓ:b, ℓ+1:b') − M_ref − s_ℓ(b) − s_{ℓ+1}(b'),

M the mean KL to the reference model's next-token distribution (M_ref = 0) or the mean loss.
Each measurement reruns the model from the first changed block's cached input. The
second-order estimate uses the empirical Fisher of the loss w.r.t. each quantized input and
the per-token noise variance Δ_t²/12 of a b-bit grid (step Δ_t = p_b·range_t / levels_b):

    ŝ_ℓ(b) ≈ ½ Σ_{linears of ℓ} Σ_t N·‖∂L/∂x_t‖² · Δ_t(b)² / 12      (N scored positions).

It checks the measured costs, or replaces them (``costs="fisher"``: no pair terms).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from twla.kernels.uniform import uniform_grid
from twla.models.adapters import Adapter
from twla.models.capture import KeptLayers, capture_layer_inputs, layer_output, layers_replaced, reloading
from twla.quantization.fake_quant import QuantLinear, wrap_linears
from twla.quantization.sections import AllocationConfig, WeightAllocationConfig
from twla.solvers.bits import Allocation, BitCosts, solve_bits
from twla.solvers.bits.problem import option_index

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun


@dataclass(frozen=True)
class Unit:
    """An allocation unit: its label, decoder layer, linears (full names) and budget weight
    (activation elements per token: the widths of its input sites)."""

    name: str
    layer: int
    linears: tuple[str, ...]
    weight: int


def allocation_units(model: nn.Module, adapter: Adapter, granularity: str) -> list[Unit]:
    """The units of ``granularity`` (``block`` or ``site``) in execution order."""
    units = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        sites = [
            Unit(
                f"{index}.{site.name}",
                index,
                tuple(f"{adapter.layers}.{index}.{path}" for path in site.linears),
                layer.get_submodule(site.linears[0]).in_features,
            )
            for site in adapter.sites
        ]
        if granularity == "site":
            units += sites
        else:
            linears = tuple(name for unit in sites for name in unit.linears)
            units.append(Unit(str(index), index, linears, sum(unit.weight for unit in sites)))
    return units


class CostProbe:
    """The metric M of a bit assignment on fixed calibration tokens, rerun from a cached block input.

    All linears start at the reference bits; block inputs and the reference log-probabilities are
    cached once, so a change starting at block ℓ costs the blocks ℓ..L−1 and the head.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        windows: Tensor,
        linears: dict[str, QuantLinear],
        reference: int,
        metric: str,
        stride: int,
        device: torch.device,
    ) -> None:
        self.model, self.adapter, self.linears = model, adapter, linears
        self.reference, self.metric = reference, metric
        self.layers = adapter.decoder_layers(model)
        self.positions = torch.arange(stride - 1, windows.shape[1] - 1, stride)
        self.targets = windows[:, self.positions + 1].to(device)
        self.reset()
        captured = capture_layer_inputs(model, adapter, windows, batch_size=windows.shape[0], device=device)
        self.inputs, (self.kwargs,) = list(captured.hidden), captured.kwargs  # one batch: kwargs per layer
        with torch.no_grad():
            for layer, kwargs in zip(self.layers, self.kwargs, strict=True):
                self.inputs.append(layer_output(layer(self.inputs[-1], **kwargs)))
            self.ref_logp = self.log_probs(self.inputs[-1])
        self.ref_nll = float(F.nll_loss(self.ref_logp.flatten(0, 1), self.targets.flatten()))
        self.passes = 0

    def log_probs(self, hidden: Tensor) -> Tensor:
        """Next-token log-probabilities at the scored positions from the last block's output."""
        norm = self.model.get_submodule(self.adapter.final_norm)
        head = self.model.get_submodule(self.adapter.head)
        return head(norm(hidden[:, self.positions])).float().log_softmax(-1)

    def reset(self) -> None:
        for module in self.linears.values():
            module.set_act_bits(self.reference)

    def assign(self, names: tuple[str, ...], bits: int) -> None:
        for name in names:
            self.linears[name].set_act_bits(bits)

    @torch.no_grad()
    def score(self, start: int = 0) -> float:
        """M of the current assignment, running blocks ``start``..L−1 (earlier ones unchanged)."""
        hidden = self.inputs[start]
        for layer, kwargs in zip(self.layers[start:], self.kwargs[start:], strict=True):
            hidden = layer_output(layer(hidden, **kwargs))
        logp = self.log_probs(hidden)
        self.passes += 1
        if self.metric == "kl":
            return float((self.ref_logp.exp() * (self.ref_logp - logp)).sum(-1).mean())
        return float(F.nll_loss(logp.flatten(0, 1), self.targets.flatten())) - self.ref_nll


def measure_costs(
    probe: CostProbe, units: list[Unit], options: tuple[int, ...], *, beta: float, progress: bool = False
) -> BitCosts:
    """Unary and adjacent pairwise costs by measurement; entries with a unit at the reference bits
    are 0 by definition and not measured, nor are the pairs when β = 0 (they would not enter the
    objective; they are left 0)."""
    L, K, ref = len(units), len(options), probe.reference
    todo = [(u, k) for u in range(L) for k in range(K) if options[k] != ref]
    todo_pairs = [
        (u, k, j)
        for u in range(L - 1 if beta > 0 else 0)
        for k in range(K)
        for j in range(K)
        if ref not in (options[k], options[j])
    ]
    bar = tqdm(total=len(todo) + len(todo_pairs), desc="measure costs", disable=not progress)
    unary = np.zeros((L, K))
    for u, k in todo:
        probe.assign(units[u].linears, options[k])
        unary[u, k] = probe.score(units[u].layer)
        probe.reset()
        bar.update()
    pairwise = np.zeros((max(L - 1, 0), K, K))
    for u, k, j in todo_pairs:
        probe.assign(units[u].linears, options[k])
        probe.assign(units[u + 1].linears, options[j])
        pairwise[u, k, j] = probe.score(units[u].layer) - unary[u, k] - unary[u + 1, j]
        probe.reset()
        bar.update()
    bar.close()
    return _bit_costs(units, options, unary, pairwise, beta)


def _bit_costs(
    units: list[Unit], options: tuple[int, ...], unary: np.ndarray, pairwise: np.ndarray, beta: float
) -> BitCosts:
    weights = np.array([unit.weight for unit in units], dtype=np.float64)
    return BitCosts(np.array(options), unary, pairwise, weights, beta, names=tuple(u.name for u in units))


def estimated_costs(probe: CostProbe, units: list[Unit], options: tuple[int, ...]) -> BitCosts:
    """The program's costs from the second-order estimate alone: ŝ as unary costs, no pair terms (β = 0)."""
    K = len(options)
    pairwise = np.zeros((max(len(units) - 1, 0), K, K))
    return _bit_costs(units, options, fisher_estimate(probe, units, options), pairwise, 0.0)


def fisher_estimate(probe: CostProbe, units: list[Unit], options: tuple[int, ...]) -> np.ndarray:
    """Second-order unary estimate ŝ (L × K) from one backward pass at 16-bit activations.

    Each block is checkpointed: its forward runs without a graph, and the backward pass reruns it
    from its input to take its gradients, so a block holds memory only while its own gradients
    are taken (and a streamed block is loaded for that moment only)."""
    K = len(options)
    per_linear = {name: np.zeros(K) for name in probe.linears}
    n_scored = probe.targets.numel()
    handles = []

    def hook(name: str, module: QuantLinear):
        def forward(mod, args, out):
            if not out.requires_grad:  # a checkpointed block's first, graph-less pass
                return
            weight = mod.weight  # a streamed layer drops it before the backward pass
            x = mod.rotate_input(args[0].detach()).float()
            steps = torch.cat(
                [uniform_grid(x, b, clip=mod.act_clips.get(b, 1.0), symmetric=mod.act.symmetric)[0] for b in options],
                -1,
            )  # per-token step Δ_t(b) of each option's grid

            def backward(grad: Tensor) -> None:
                g2 = (grad.float() @ weight.float()).pow(2).sum(-1)  # ‖∂L/∂x_t‖² per token
                noise = (g2[..., None] * steps.pow(2) / 12).flatten(0, -2).sum(0)
                per_linear[name] += 0.5 * n_scored * noise.double().cpu().numpy()

            out.register_hook(backward)

        return module.register_forward_hook(forward)

    def block(layer: nn.Module, kwargs: dict) -> Callable[[Tensor], Tensor]:
        return lambda hidden: layer_output(layer(hidden, **kwargs))

    for name, module in probe.linears.items():
        module.set_act_bits(16)
        handles.append(hook(name, module))
    try:
        with torch.enable_grad():
            hidden = probe.inputs[0].requires_grad_()
            for layer, kwargs in zip(probe.layers, probe.kwargs, strict=True):
                hidden = checkpoint(block(layer, kwargs), hidden, use_reentrant=True, preserve_rng_state=False)
            loss = F.nll_loss(probe.log_probs(hidden).flatten(0, 1), probe.targets.flatten())
            loss.backward()  # (a checkpointed graph takes no ``inputs``)
    finally:
        for handle in handles:
            handle.remove()
        probe.inputs[0].requires_grad_(False).grad = None
        probe.reset()
    estimate = np.array([sum(per_linear[name] for name in unit.linears) for unit in units])
    estimate[:, [k for k, b in enumerate(options) if b == probe.reference]] = 0.0
    return estimate


def estimate_agreement(measured: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """How well the estimate predicts the measured unary costs (entries off the reference)."""
    mask = estimate > 0
    m, e = measured[mask], estimate[mask]
    positive = m > 0
    return {
        "spearman": float(stats.spearmanr(m, e).statistic) if m.size > 1 else float("nan"),
        "pearson_log": float(np.corrcoef(np.log(m[positive]), np.log(e[positive]))[0, 1])
        if positive.sum() > 1
        else float("nan"),
        "median_ratio": float(np.median(m[positive] / e[positive])) if positive.any() else float("nan"),
        "entries": int(mask.sum()),
    }


@dataclass
class AllocationReport:
    """What ILA-AMP chose and how well its model predicted the outcome.

    predicted: Σ s + Σ c of the chosen bits (β = 1: the measured additive model; Σ s alone when
    β = 0, whose pairs are not measured; Σ ŝ, a loss increase, with Fisher costs); measured: the
    metric of the allocated model on the same tokens; uniform: the same two for every unit at the
    budget's bits, when that is an option; kept_uniform: those uniform bits measured no worse, so
    they are the ones set (``bits``).
    """

    config: AllocationConfig
    units: list[Unit]
    costs: BitCosts
    estimate: np.ndarray
    agreement: dict[str, float] | None
    allocation: Allocation
    predicted: float
    measured: float
    uniform: dict[str, float] | None
    passes: int
    seconds: float
    reference_nll: float = 0.0
    bits: dict[str, int] = field(default_factory=dict)
    kept_uniform: bool = False

    @property
    def mean_bits(self) -> float:
        """The mean activation bits set on the model."""
        return float(self.uniform["bits"]) if self.kept_uniform else self.allocation.mean_bits

    def to_dict(self) -> dict:
        return {
            "granularity": self.config.granularity,
            "metric": self.config.metric,
            "cost_source": self.config.costs,
            "units": [u.name for u in self.units],
            "weights": [u.weight for u in self.units],
            "costs": self.costs.to_dict(),
            "estimate": self.estimate.tolist(),
            "agreement": self.agreement,
            "allocation": self.allocation.to_dict(),
            "predicted": self.predicted,
            "measured": self.measured,
            "uniform": self.uniform,
            "passes": self.passes,
            "seconds": self.seconds,
            "reference_nll": self.reference_nll,
            "kept_uniform": self.kept_uniform,
        }


@contextmanager
def uniform_bits(model: nn.Module, adapter: Adapter, report: AllocationReport) -> Iterator[int]:
    """The model with every allocated linear at the budget's bits (the allocation's comparison; the
    model without ILA-AMP when the layer-wise pass ran at those bits), the set bits back on exit."""
    if report.uniform is None:
        raise ValueError("the budget's bits are not an option of this allocation: there is no uniform comparison")
    linears = wrap_linears(model, adapter)
    for name in report.bits:
        linears[name].set_act_bits(report.uniform["bits"])
    try:
        yield report.uniform["bits"]
    finally:
        for name, bits in report.bits.items():
            linears[name].set_act_bits(bits)


def _evaluate(probe: CostProbe, costs: BitCosts, units: list[Unit], bits: list[int]) -> tuple[float, float]:
    """(Σ s + Σ c, measured metric) of a per-unit assignment; leaves the assignment in place."""
    for unit, b in zip(units, bits, strict=True):
        probe.assign(unit.linears, b)
    return sum(costs.parts(option_index(costs, bits))), probe.score(0)


def cost_windows(calibration: Tensor, cfg: AllocationConfig | WeightAllocationConfig) -> Tensor:
    """The calibration tokens the costs are measured on (first ``samples`` windows, ``seqlen`` long)."""
    windows = calibration[: cfg.samples, : cfg.seqlen]
    if windows.shape[1] <= cfg.stride:
        raise ValueError(f"calibration windows of {windows.shape[1]} tokens are too short for stride {cfg.stride}")
    return windows


def allocate(
    model: nn.Module,
    adapter: Adapter,
    calibration: Tensor,
    *,
    cfg: AllocationConfig,
    device: torch.device,
    progress: bool = True,
    kept: KeptLayers | None = None,
) -> AllocationReport:
    """Measure the costs on calibration tokens, solve for the bits, and set them on the model's
    linears (with each bit-width's calibrated clipping ratio). When the budget's bits are an option
    and every unit at them measures no worse than the program's choice, those uniform bits are set
    instead (the program's choice stays in the report).

    kept: the quantized decoder layers are not in ``model`` (on the meta device) but in ``kept``, and
    every pass, forward or backward, reloads them one at a time (the same costs and bits)."""
    start = time.perf_counter()
    linears = wrap_linears(model, adapter)
    missing = [n for n, m in linears.items() if any(b not in m.act_clips for b in cfg.clip_bits)]
    if missing:
        raise ValueError(f"{missing[0]}: no calibrated clipping ratio for every option; quantize with this allocation")
    units = allocation_units(model, adapter, cfg.granularity)
    windows = cost_windows(calibration, cfg)
    with (
        nullcontext()
        if kept is None
        else layers_replaced(model, adapter, reloading(lambda i: kept.reload(i)[0], kept.unload, device))
    ):
        model.to(device)
        try:
            probe = CostProbe(model, adapter, windows, linears, cfg.reference, cfg.metric, cfg.stride, device)
            agreement = None
            if cfg.costs == "fisher":
                costs = estimated_costs(probe, units, cfg.options)
                estimate = costs.unary
            else:
                costs = measure_costs(probe, units, cfg.options, beta=cfg.beta, progress=progress)
                estimate = fisher_estimate(probe, units, cfg.options)
                agreement = estimate_agreement(costs.unary, estimate)
            allocation = solve_bits(costs, cfg.budget, solver=cfg.solver)
            uniform = None
            if int(cfg.budget) == cfg.budget and int(cfg.budget) in cfg.options:
                pred, meas = _evaluate(probe, costs, units, [int(cfg.budget)] * len(units))
                uniform = {"bits": int(cfg.budget), "predicted": pred, "measured": meas}
            predicted, measured = _evaluate(probe, costs, units, allocation.bits)
            kept_uniform = uniform is not None and uniform["measured"] <= measured
            applied = [uniform["bits"]] * len(units) if kept_uniform else allocation.bits
            if kept_uniform:  # the program's bits are in place from their evaluation
                for unit in units:
                    probe.assign(unit.linears, uniform["bits"])
        finally:
            model.to("cpu")
    return AllocationReport(
        config=cfg,
        units=units,
        costs=costs,
        estimate=estimate,
        agreement=agreement,
        allocation=allocation,
        predicted=predicted,
        measured=measured,
        uniform=uniform,
        passes=probe.passes,
        seconds=time.perf_counter() - start,
        reference_nll=probe.ref_nll,
        bits={name: b for unit, b in zip(units, applied, strict=True) for name in unit.linears},
        kept_uniform=kept_uniform,
    )


def allocate_bits(run: QuantRun) -> dict:
    """Stage, after the last layer (and end-to-end reconstruction): the activation bits of every
    linear, from costs measured on the quantized model; kept layers are then finished."""
    report = run.report
    report.allocation = allocate(
        run.model,
        run.adapter,
        run.calibration,
        cfg=run.config.allocation,
        device=run.device,
        progress=run.progress,
        kept=run.stream,
    )
    for record in report.records:
        record.act_bits = report.allocation.bits[record.name]
        record.act_clip = (record.act_clips or {}).get(record.act_bits, 1.0)
    for index in range(len(run.layers) if run.stream is not None else 0):
        run.stream.finish(index, *run.stream.reload(index))
    return {"mean bits": report.allocation.mean_bits, "kept uniform": report.allocation.kept_uniform}
