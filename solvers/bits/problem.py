"""The activation bit-allocation problem of ILA-AMP and its answer.

Units ℓ = 1..L in execution order choose one option k_ℓ from the bit-widths 𝔅 = (b_1..b_K):

    min  Σ_ℓ s_ℓ(k_ℓ) + β Σ_{ℓ<L} c_ℓ(k_ℓ, k_{ℓ+1})
    s.t. Σ_ℓ w_ℓ b_{k_ℓ} ≤ B · Σ_ℓ w_ℓ              (mean-bits budget B, weights w_ℓ > 0)
         Σ_ℓ a^{(j)}_ℓ(k_ℓ) ≤ r_j  for each extra resource j (optional).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Budgets and resource limits are compared with this relative tolerance.
TOLERANCE = 1e-9


class InfeasibleBudgetError(ValueError):
    """No allocation meets the budget; ``min_budget`` is the smallest feasible mean bits (or None)."""

    def __init__(self, message: str, min_budget: float | None = None) -> None:
        super().__init__(message)
        self.min_budget = min_budget


def check_mean_budget(budget: float, bits: Sequence[int]) -> None:
    """Raise unless ``budget`` is a finite mean reachable with options ``bits``: every weighted mean
    is at least min(bits), reached with every unit at the lowest option."""
    if not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number of mean bits, got {budget}")
    low = float(min(bits))
    if budget < low * (1 - TOLERANCE):
        raise InfeasibleBudgetError(
            f"budget {budget:g} mean bits is infeasible: the smallest feasible budget is {low:g} "
            f"(every unit at {low:g} bits)",
            low,
        )


def _array(value: Any, name: str, ndim: int, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


@dataclass(frozen=True)
class Resource:
    """An extra linear resource: Σ_ℓ coeffs[ℓ, k_ℓ] ≤ limit (e.g. a latency or memory budget)."""

    coeffs: np.ndarray
    limit: float
    name: str = "resource"


@dataclass(frozen=True, eq=False)
class BitCosts:
    """Data of the allocation problem.

    bits: the K options; unary: (L, K) costs s_ℓ(b_k); pairwise: (L−1, K, K) costs c_ℓ(b_k, b_k')
    between unit ℓ and ℓ+1; weights: (L,) budget weights w_ℓ (default 1); beta: interaction
    weight β; resources: extra linear constraints; names: optional unit labels.
    """

    bits: np.ndarray
    unary: np.ndarray
    pairwise: np.ndarray
    weights: np.ndarray | None = None
    beta: float = 1.0
    resources: tuple[Resource, ...] = ()
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        bits = _array(self.bits, "bits", 1)
        if bits.size == 0 or (bits != np.round(bits)).any() or (bits <= 0).any():
            raise ValueError(f"bits must be a non-empty list of positive integers, got {bits.tolist()}")
        if len(set(bits.tolist())) != bits.size:
            raise ValueError(f"bits must be distinct, got {bits.astype(int).tolist()}")
        unary = _array(self.unary, "unary", 2)
        L, K = unary.shape
        if L == 0 or K != bits.size:
            raise ValueError(f"unary must have shape (L ≥ 1, {bits.size}) for {bits.size} options, got {unary.shape}")
        pair_value = np.zeros((0, K, K)) if L == 1 and np.size(self.pairwise) == 0 else self.pairwise
        pairwise = _array(pair_value, "pairwise", 3)
        if pairwise.shape != (L - 1, K, K):
            raise ValueError(f"pairwise must have shape ({L - 1}, {K}, {K}) for {L} units, got {pairwise.shape}")
        weights = np.ones(L) if self.weights is None else _array(self.weights, "weights", 1)
        if weights.shape != (L,) or (weights <= 0).any():
            raise ValueError(f"weights must be {L} positive numbers, got shape {weights.shape}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number ≥ 0, got {self.beta}")
        resources = []
        for res in self.resources:
            coeffs = _array(res.coeffs, f"resource {res.name!r} coeffs", 2)
            if coeffs.shape != (L, K) or not math.isfinite(res.limit):
                raise ValueError(f"resource {res.name!r} needs ({L}, {K}) coefficients and a finite limit")
            resources.append(Resource(coeffs, float(res.limit), res.name))
        if self.names is not None and len(self.names) != L:
            raise ValueError(f"names must label all {L} units, got {len(self.names)}")
        for key, value in dict(
            bits=bits.astype(np.int64),
            unary=unary,
            pairwise=pairwise,
            weights=weights,
            beta=float(self.beta),
            resources=tuple(resources),
        ).items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BitCosts:
        """From a plain mapping with keys bits, unary, pairwise and optional weights, beta."""
        missing = {"bits", "unary", "pairwise"} - set(data)
        unknown = set(data) - {"bits", "unary", "pairwise", "weights", "beta", "names"}
        if missing or unknown:
            problem = f"missing {sorted(missing)}" if missing else f"unknown {sorted(unknown)}"
            raise ValueError(f"cost mapping: {problem}; expected keys bits, unary, pairwise[, weights, beta, names]")
        names = data.get("names")
        return cls(
            data["bits"],
            data["unary"],
            data["pairwise"],
            data.get("weights"),
            float(data.get("beta", 1.0)),
            names=tuple(names) if names is not None else None,
        )

    @property
    def units(self) -> int:
        return self.unary.shape[0]

    @property
    def options(self) -> int:
        return self.unary.shape[1]

    def objective(self, choice: np.ndarray) -> np.ndarray:
        """The objective of option indices ``choice`` (shape (..., L))."""
        choice = np.asarray(choice)
        L = self.units
        value = self.unary[np.arange(L), choice].sum(-1)
        if L > 1:
            value = value + self.beta * self.pairwise[np.arange(L - 1), choice[..., :-1], choice[..., 1:]].sum(-1)
        return value

    def parts(self, choice: np.ndarray) -> tuple[float, float]:
        """(Σ s, Σ c) of one choice: the unary and the pairwise part (without β)."""
        choice = np.asarray(choice)
        L = self.units
        pair = float(self.pairwise[np.arange(L - 1), choice[:-1], choice[1:]].sum()) if L > 1 else 0.0
        return float(self.unary[np.arange(L), choice].sum()), pair

    def mean_bits(self, choice: np.ndarray) -> np.ndarray:
        """Weighted mean bits Σ w b / Σ w of option indices ``choice`` (shape (..., L))."""
        return (self.bits[np.asarray(choice)] * self.weights).sum(-1) / self.weights.sum()

    def feasible(self, choice: np.ndarray, budget: float) -> np.ndarray:
        """Whether ``choice`` (shape (..., L)) meets the budget and every extra resource."""
        choice = np.asarray(choice)
        ok = self.mean_bits(choice) <= budget * (1 + TOLERANCE)
        for res in self.resources:
            used = res.coeffs[np.arange(self.units), choice].sum(-1)
            ok = ok & (used <= res.limit + TOLERANCE * max(1.0, abs(res.limit)))
        return ok

    def check_budget(self, budget: float) -> None:
        """Raise :class:`InfeasibleBudgetError` when no allocation can meet the budget on its own
        (the smallest feasible mean is min(bits)) or an extra resource alone."""
        check_mean_budget(budget, self.bits)
        for res in self.resources:
            least = float(res.coeffs.min(1).sum())
            if least > res.limit + TOLERANCE * max(1.0, abs(res.limit)):
                raise InfeasibleBudgetError(
                    f"resource {res.name!r}: limit {res.limit:g} is infeasible, every allocation uses ≥ {least:g}"
                )

    def to_dict(self) -> dict:
        return {
            "bits": self.bits.tolist(),
            "unary": self.unary.tolist(),
            "pairwise": self.pairwise.tolist(),
            "weights": self.weights.tolist(),
            "beta": self.beta,
            "names": list(self.names) if self.names else None,
        }


def as_costs(costs: BitCosts | Mapping[str, Any]) -> BitCosts:
    """A :class:`BitCosts` from itself or from a plain mapping (see :meth:`BitCosts.from_mapping`)."""
    if isinstance(costs, BitCosts):
        return costs
    if isinstance(costs, Mapping):
        return BitCosts.from_mapping(costs)
    raise TypeError(f"costs must be a BitCosts or a mapping with bits/unary/pairwise, got {type(costs).__name__}")


def _rational(values: np.ndarray, what: str) -> list[Fraction]:
    fracs = [Fraction(float(v)).limit_denominator(10**6) for v in values.ravel()]
    for v, f in zip(values.ravel(), fracs, strict=True):
        if float(f) != v:
            raise ValueError(
                f"{what} must be rational with denominators ≤ 10⁶ for an integer formulation (got {v!r}); "
                "use the scip, milp or cvxpy solver, or round the weights"
            )
    return fracs


def integer_constraint(coeffs: np.ndarray, limit: float, what: str) -> tuple[np.ndarray, int]:
    """The constraint Σ_ℓ coeffs[ℓ, k_ℓ] ≤ limit as an equivalent one with integer coefficients
    (scaled exactly, divided by their gcd) and an integer limit (floored)."""
    fracs = _rational(np.asarray(coeffs, dtype=np.float64), what)
    denom = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * denom) for f in fracs]
    g = math.gcd(*ints) or 1
    scaled = np.array([i // g for i in ints], dtype=np.int64).reshape(np.shape(coeffs))
    cap = limit * denom / g
    return scaled, math.floor(cap + TOLERANCE * max(1.0, abs(cap)))


def budget_constraint(costs: BitCosts, budget: float) -> tuple[np.ndarray, int]:
    """The budget Σ w_ℓ b_{k_ℓ} ≤ B Σ w_ℓ in integer form (coefficients (L, K), limit)."""
    return integer_constraint(np.outer(costs.weights, costs.bits), budget * costs.weights.sum(), "budget weights")


class SolverTimeLimit(RuntimeError):
    """An exact solver's time limit ran out before it had any allocation."""


class Deadline:
    """A solver's wall-clock time limit, counted from construction: model building and search
    together stay within it (the search gets what building left)."""

    def __init__(self, limit: float, solver: str, units: int) -> None:
        if not limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {limit}")
        self.limit, self.solver, self.units = float(limit), solver, units
        self.start = time.perf_counter()

    def remaining(self, stage: str) -> float:
        """Seconds left; :class:`SolverTimeLimit` when none are, naming what ran out of time."""
        left = self.limit - (time.perf_counter() - self.start)
        if left <= 0:
            raise self.expired(stage)
        return left

    def run(self, search: Callable[[float], T], stage: str = "searching") -> T:
        """``search(seconds left)`` in a worker thread, waited for until the limit at most: a
        backend that overruns its own limit (in setup, presolve or compilation) is abandoned to
        end on its own, and the call raises :class:`SolverTimeLimit`. The search is given what
        is left less 3 % of the limit, kept for reading its answer."""
        left = self.remaining("building its model") - 0.03 * self.limit
        if left <= 0:
            raise self.expired("building its model")
        outcome: list[tuple[bool, object]] = []

        def work() -> None:
            try:
                outcome.append((True, search(left)))
            except BaseException as err:  # handed to the calling thread
                outcome.append((False, err))

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(max(0.0, self.limit - (time.perf_counter() - self.start)))
        if not outcome:
            raise self.expired(stage)
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def expired(self, stage: str) -> SolverTimeLimit:
        return SolverTimeLimit(
            f"{self.solver} found no allocation for {self.units} units within its time limit of {self.limit:g} s "
            f"(it ran out while {stage}); raise time_limit, or use dp, exact and fast on chains"
        )


@dataclass
class Solution:
    """What a solver found: option indices, status (optimal, time limit: the best feasible one
    found when the limit ran out, heuristic, rounded) and a proven lower bound on the objective
    where it has one."""

    choice: np.ndarray
    status: str
    bound: float | None = None


@dataclass
class Allocation:
    """The chosen bits per unit and how good they are.

    objective: Σ s + β Σ c of the choice (recomputed in float64); bound: a proven lower bound
    on the optimum where the solver gives one; gap = objective − bound (relative_gap: divided
    by |objective|); status "time limit": the best allocation found when it ran out; mean_bits: realized
    weighted mean; unary / pairwise: the two parts of the objective (pairwise without β).
    """

    bits: list[int]
    objective: float
    bound: float | None
    status: str
    seconds: float
    solver: str
    mean_bits: float
    budget: float
    unary: float
    pairwise: float
    names: list[str] | None = field(default=None)

    @property
    def gap(self) -> float | None:
        return None if self.bound is None else max(0.0, self.objective - self.bound)

    @property
    def relative_gap(self) -> float | None:
        return None if self.gap is None else self.gap / max(abs(self.objective), 1e-300)

    @classmethod
    def from_solution(cls, costs: BitCosts, budget: float, solution: Solution, seconds: float, solver: str):
        choice = np.asarray(solution.choice, dtype=np.int64)
        unary, pair = costs.parts(choice)
        return cls(
            bits=costs.bits[choice].astype(int).tolist(),
            objective=float(costs.objective(choice)),
            bound=solution.bound,
            status=solution.status,
            seconds=seconds,
            solver=solver,
            mean_bits=float(costs.mean_bits(choice)),
            budget=budget,
            unary=unary,
            pairwise=pair,
            names=list(costs.names) if costs.names else None,
        )

    def to_dict(self) -> dict:
        return {**self.__dict__, "gap": self.gap, "relative_gap": self.relative_gap}


def option_index(costs: BitCosts, bits: Sequence[int]) -> np.ndarray:
    """Option indices of a per-unit list of bit-widths."""
    lookup = {int(b): k for k, b in enumerate(costs.bits)}
    try:
        return np.array([lookup[int(b)] for b in bits], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"bit-width {exc.args[0]} is not an option ({costs.bits.tolist()})") from None
