"""``solve_bits(costs, budget, solver=...)``: one entry point for every allocation solver."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from twla.solvers.bits.cpsat import solve_cpsat
from twla.solvers.bits.dp import solve_dp
from twla.solvers.bits.heuristics import solve_brute_force, solve_greedy
from twla.solvers.bits.milp import solve_cvxpy, solve_cvxpy_lp, solve_milp, solve_scip
from twla.solvers.bits.problem import Allocation, BitCosts, Solution, as_costs

SOLVERS: dict[str, Callable[..., Solution]] = {
    "dp": solve_dp,
    "cp-sat": solve_cpsat,
    "scip": solve_scip,
    "milp": solve_milp,
    "cvxpy": solve_cvxpy,
    "cvxpy-lp": solve_cvxpy_lp,
    "greedy": solve_greedy,
    "brute-force": solve_brute_force,
}
EXACT_SOLVERS = ("dp", "cp-sat", "scip", "milp", "cvxpy", "brute-force")


def solve_bits(costs: BitCosts | Mapping[str, Any], budget: float, *, solver: str = "dp", **options: Any) -> Allocation:
    """Choose one bit-width per unit minimizing Σ s + β Σ c under the mean-bits budget.

    costs: a :class:`BitCosts` or a mapping with ``bits``, ``unary`` (L×K), ``pairwise``
    ((L−1)×K×K) and optional ``weights`` (default 1) and ``beta`` (default 1); budget: the
    weighted mean bits Σ w·b ≤ budget·Σ w; solver: one of :data:`SOLVERS`; options go to the
    solver (e.g. ``time_limit``). Raises :class:`InfeasibleBudgetError` for an infeasible budget.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    costs = as_costs(costs)
    budget = float(budget)
    costs.check_budget(budget)
    start = time.perf_counter()
    solution = SOLVERS[solver](costs, budget, **options)
    seconds = time.perf_counter() - start
    if not costs.feasible(solution.choice, budget):
        raise RuntimeError(f"solver {solver} returned an allocation that violates the constraints")
    return Allocation.from_solution(costs, budget, solution, seconds, solver)
