"""OR-Tools CP-SAT model of the allocation problem.

Booleans x_{ℓ,k} (exactly one per unit) and y_{ℓ,k,k'} with the marginal-consistency
constraints Σ_{k'} y_{ℓ,k,k'} = x_{ℓ,k}, Σ_k y_{ℓ,k,k'} = x_{ℓ+1,k'}. CP-SAT needs integers: the
budget and extra resources are scaled exactly; costs are scaled by σ and rounded, so the optimum
is exact for the rounded costs and the reported bound subtracts the worst rounding error,
(2L − 1) / (2σ).
"""

from __future__ import annotations

import numpy as np

from twla.solvers.bits.heuristics import greedy_start
from twla.solvers.bits.problem import (
    BitCosts,
    Deadline,
    InfeasibleBudgetError,
    Solution,
    budget_constraint,
    integer_constraint,
)

# Largest scaled total |cost| (keeps CP-SAT's integer objective and its float bound exact).
COST_RESOLUTION = 1e12


def solve_cpsat(
    costs: BitCosts, budget: float, *, time_limit: float = 60.0, workers: int = 1, seed: int = 0
) -> Solution:
    """CP-SAT, started from the greedy allocation (a hint, without extra resources), within
    ``time_limit`` seconds of wall time in all; ``workers=1`` with a fixed seed is deterministic."""
    from ortools.sat.python import cp_model

    L, K = costs.units, costs.options
    deadline = Deadline(time_limit, "cp-sat", L)
    unary = costs.unary
    pair = costs.beta * costs.pairwise
    total = np.abs(unary).max(1).sum() + (np.abs(pair).max((1, 2)).sum() if L > 1 else 0.0)
    scale = COST_RESOLUTION / max(total, 1e-300)
    model = cp_model.CpModel()
    x = [[model.NewBoolVar(f"x{ell}_{k}") for k in range(K)] for ell in range(L)]
    for row in x:
        model.AddExactlyOne(row)
    terms = [(int(round(scale * unary[ell, k])), x[ell][k]) for ell in range(L) for k in range(K)]
    for ell in range(L - 1):
        if ell % 256 == 0:
            deadline.remaining("building its model")
        y = [[model.NewBoolVar(f"y{ell}_{k}_{j}") for j in range(K)] for k in range(K)]
        for k in range(K):
            model.Add(sum(y[k]) == x[ell][k])
            model.Add(sum(y[j][k] for j in range(K)) == x[ell + 1][k])
        terms += [(int(round(scale * pair[ell, k, j])), y[k][j]) for k in range(K) for j in range(K)]
    constraints = [budget_constraint(costs, budget)]
    constraints += [integer_constraint(r.coeffs, r.limit, f"resource {r.name!r}") for r in costs.resources]
    for coeffs, limit in constraints:
        model.Add(sum(int(coeffs[ell, k]) * x[ell][k] for ell in range(L) for k in range(K)) <= limit)
    model.Minimize(sum(c * v for c, v in terms if c))
    hint = greedy_start(costs, budget)
    for ell in range(L if hint is not None else 0):
        for k in range(K):
            model.AddHint(x[ell][k], int(hint[ell] == k))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    solver.parameters.linearization_level = 2  # the tight LP of the marginal-consistency model

    def search(left: float) -> int:
        solver.parameters.max_time_in_seconds = left
        return solver.Solve(model)

    status = deadline.run(search)
    if status == cp_model.INFEASIBLE:
        raise InfeasibleBudgetError("no allocation satisfies the budget and the extra resource limits")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise deadline.expired(f"searching ({solver.StatusName(status)})")
    choice = np.array([[solver.BooleanValue(v) for v in row] for row in x]).argmax(1)
    bound = solver.BestObjectiveBound() / scale - (2 * L - 1) / (2 * scale)
    return Solution(choice, "optimal" if status == cp_model.OPTIMAL else "time limit", bound)
