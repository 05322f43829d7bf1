"""Weight mixed precision: a weight format per linear, from measured costs and the integer program
of ILA-AMP.

Units ℓ are the quantized linears in execution order; option k is a weight format (the method's
ternary weights, or N-bit uniform integers) that stores b_ℓ(k) bits for ℓ's shape. On fixed
calibration tokens, with every other linear at full precision,

    s_ℓ(k) = M(ℓ:k) − M_FP        (M: the mean KL to the full-precision next-token distribution, or the loss)

and the formats solve the multiple-choice knapsack

    min Σ_ℓ s_ℓ(k_ℓ)   s.t.   Σ_ℓ b_ℓ(k_ℓ) ≤ B · Σ_ℓ n_ℓ     (B stored bits per weight, n_ℓ weights of ℓ)

with the bit solvers (the stored bits as an extra resource; no pairwise terms). A candidate is
the format's block fit without error compensation, in the linear's input rotation:
Ŵ = Q(W R) Rᵀ, a cheap stand-in for the compensated weight that the layer-wise solve then
computes in the chosen format. Each measurement reruns the model from the linear's block on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.models.adapters import Adapter
from twla.quantization.allocation import CostProbe, cost_windows
from twla.quantization.rotation import Factors
from twla.quantization.sections import UniformConfig, WeightAllocationConfig, WeightConfig
from twla.quantization.weights import quantize_weight, stored_bits
from twla.solvers.bits import Allocation, BitCosts, solve_bits
from twla.solvers.bits.problem import InfeasibleBudgetError, Resource
from twla.solvers.kronecker import kron_apply, kron_apply_t

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun


@dataclass(frozen=True)
class WeightUnit:
    """A quantized linear: its full name, decoder layer, input site and weight shape (out, in)."""

    name: str
    layer: int
    site: str
    shape: tuple[int, int]

    @property
    def weights(self) -> int:
        return self.shape[0] * self.shape[1]


def weight_units(model: nn.Module, adapter: Adapter) -> list[WeightUnit]:
    """Every quantized linear of the decoder layers, in execution order."""
    units = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for site in adapter.sites:
            for path in site.linears:
                module = layer.get_submodule(path)
                shape = (module.out_features, module.in_features)
                units.append(WeightUnit(f"{adapter.layers}.{index}.{path}", index, site.name, shape))
    return units


def format_config(option: str, base: WeightConfig) -> WeightConfig:
    """The weight quantizer of ``option``: ``ternary`` is the method's own ``base``; ``intN``
    uniform N-bit weights with ``base``'s block size, compensation, order and damping."""
    if option == "ternary":
        return base
    bits = int(option.removeprefix("int"))
    return UniformConfig(bits, base.block_size, base.compensate, base.reorder, base.damp)


def stored_table(units: list[WeightUnit], configs: list[WeightConfig]) -> np.ndarray:
    """(L, K) stored bits of every unit in every format."""
    return np.array([[stored_bits(cfg, unit.shape) for cfg in configs] for unit in units], dtype=np.float64)


def check_weight_budget(units: list[WeightUnit], configs: list[WeightConfig], budget: float) -> None:
    """Refuse a budget below the stored bits per weight of every linear in its cheapest format."""
    least = float(stored_table(units, configs).min(1).sum()) / sum(u.weights for u in units)
    if budget < least * (1 - 1e-9):
        raise InfeasibleBudgetError(
            f"weight allocation budget {budget:g} bits per weight is infeasible: every linear in its cheapest "
            f"format stores {least:.4f}",
            least,
        )


def candidate(weight: Tensor, cfg: WeightConfig, rotation: Factors | None) -> Tensor:
    """Q(W R) Rᵀ: ``weight`` quantized in ``cfg``'s format without compensation, in the rotated basis."""
    W = weight.detach().to(torch.float64)
    if rotation is not None:
        R1, R2 = (r.to(W) for r in rotation)
        W = kron_apply(W, R1, R2)
    eye = torch.eye(W.shape[1], dtype=torch.float64, device=W.device)
    quantized, _ = quantize_weight(W, eye, replace(cfg, compensate=False, reorder=False))
    W_hat = quantized.dequantize(torch.float64).to(W.device)
    if rotation is not None:
        W_hat = kron_apply_t(W_hat, R1, R2)
    return W_hat.to(weight.dtype)


@dataclass
class WeightAllocationReport:
    """What the weight allocation chose and how well its additive model predicted the outcome.

    stored: (L, K) stored bits; choice: the chosen option of each unit; formats: the chosen format
    by linear name; predicted: Σ s of the
    choice; measured: the metric with every linear at its chosen candidate at once; ternary: the
    same two with every linear ternary (when ternary is an option); stored_bits: the choice's
    stored bits per weight.
    """

    config: WeightAllocationConfig
    units: list[WeightUnit]
    costs: BitCosts
    stored: np.ndarray
    allocation: Allocation
    choice: list[int]
    formats: dict[str, str]
    predicted: float
    measured: float
    ternary: dict[str, float] | None
    stored_bits: float
    passes: int
    seconds: float

    def counts(self) -> dict[str, int]:
        """How many linears got each format."""
        return {o: sum(f == o for f in self.formats.values()) for o in self.config.options}

    def to_dict(self) -> dict:
        return {
            "options": list(self.config.options),
            "budget": self.config.budget,
            "metric": self.config.metric,
            "units": [u.name for u in self.units],
            "weights": [u.weights for u in self.units],
            "unary": self.costs.unary.tolist(),
            "stored": self.stored.tolist(),
            "allocation": self.allocation.to_dict(),
            "choice": self.choice,
            "formats": self.formats,
            "counts": self.counts(),
            "predicted": self.predicted,
            "measured": self.measured,
            "ternary": self.ternary,
            "stored_bits": self.stored_bits,
            "passes": self.passes,
            "seconds": self.seconds,
        }


class _Candidates:
    """Sets linears of the probe's model to format candidates and back to full precision."""

    def __init__(self, model: nn.Module, configs: list[WeightConfig], rotations: dict[tuple[int, str], Factors]):
        self.model, self.configs, self.rotations = model, configs, rotations
        self.saved: dict[str, Tensor] = {}

    def set(self, unit: WeightUnit, option: int) -> None:
        weight = self.model.get_submodule(unit.name).weight
        original = self.saved.setdefault(unit.name, weight.detach().clone())
        weight.data.copy_(candidate(original, self.configs[option], self.rotations.get((unit.layer, unit.site))))

    def restore(self) -> None:
        for name, original in self.saved.items():
            self.model.get_submodule(name).weight.data.copy_(original)
        self.saved = {}


def choose_formats(
    model: nn.Module,
    adapter: Adapter,
    calibration: Tensor,
    *,
    base: WeightConfig,
    cfg: WeightAllocationConfig,
    rotations: dict[tuple[int, str], Factors],
    device: torch.device,
    progress: bool = True,
) -> WeightAllocationReport:
    """Measure every linear's cost in every format on the full-precision ``model`` (its linears in
    their input basis; ``rotations`` by (layer, site)), solve for the formats under the budget, and
    measure the chosen mix; the model's weights are left as they were."""
    start = time.perf_counter()
    units = weight_units(model, adapter)
    configs = [format_config(o, base) for o in cfg.options]
    stored = stored_table(units, configs)
    total = sum(u.weights for u in units)
    check_weight_budget(units, configs, cfg.budget)
    model.to(device)
    candidates = _Candidates(model, configs, rotations)
    try:
        probe = CostProbe(model, adapter, cost_windows(calibration, cfg), {}, 16, cfg.metric, cfg.stride, device)
        unary = np.zeros((len(units), len(configs)))
        bar = tqdm(total=unary.size, desc="weight format costs", disable=not progress)
        for u, unit in enumerate(units):
            for k in range(len(configs)):
                candidates.set(unit, k)
                unary[u, k] = probe.score(unit.layer)
                bar.update()
            candidates.restore()
        bar.close()
        labels = np.round(1000 * stored.sum(0) / total).astype(np.int64)  # an option's label: its milli-bits
        if len(set(labels.tolist())) != len(labels):
            raise ValueError(f"weight formats {cfg.options} store the same bits per weight; choose distinct ones")
        costs = BitCosts(
            labels,
            unary,
            np.zeros((len(units) - 1, len(configs), len(configs))),
            np.array([u.weights for u in units], dtype=np.float64),
            beta=0.0,
            resources=(Resource(stored, cfg.budget * total, "stored bits"),),
            names=tuple(u.name for u in units),
        )
        allocation = solve_bits(costs, float(labels.max()), solver=cfg.solver)
        choice = [int(np.flatnonzero(labels == b)[0]) for b in allocation.bits]

        def mix(options: list[int]) -> dict[str, float]:
            for unit, k in zip(units, options, strict=True):
                candidates.set(unit, k)
            measured = probe.score(0)
            candidates.restore()
            return {"predicted": float(unary[np.arange(len(units)), options].sum()), "measured": measured}

        chosen = mix(choice)
        ternary = mix([cfg.options.index("ternary")] * len(units)) if "ternary" in cfg.options else None
    finally:
        candidates.restore()
        model.to("cpu")
    return WeightAllocationReport(
        config=cfg,
        units=units,
        costs=costs,
        stored=stored,
        allocation=allocation,
        choice=choice,
        formats={unit.name: cfg.options[k] for unit, k in zip(units, choice, strict=True)},
        predicted=chosen["predicted"],
        measured=chosen["measured"],
        ternary=ternary,
        stored_bits=float(stored[np.arange(len(units)), choice].sum()) / total,
        passes=probe.passes,
        seconds=time.perf_counter() - start,
    )


def allocate_weights(run: QuantRun) -> dict:
    """Stage, before the layer-wise pass: the weight format of every linear (module docstring),
    which the layer-wise solve then quantizes it in."""
    config = run.config
    report = choose_formats(
        run.model,
        run.adapter,
        run.calibration,
        base=config.weights,
        cfg=config.weight_allocation,
        rotations=run.rotations,
        device=run.device,
        progress=run.progress,
    )
    run.report.weight_allocation = report
    run.formats = {name: format_config(option, config.weights) for name, option in report.formats.items()}
    return {"stored bits": report.stored_bits, **{f"{o} linears": n for o, n in report.counts().items()}}
