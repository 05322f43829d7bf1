"""Exact chain dynamic program for the allocation problem.

The interaction graph is a path, so with the budget in integer units the value function

    V_ℓ(k, r) = s_ℓ(k) + min_{k'} [ V_{ℓ−1}(k', r − a_ℓ(k)) + β c_{ℓ−1}(k', k) ],   a_ℓ(k) = w_ℓ b_k / g

over (unit, option, budget used) is exact: O(L · K² · R) time for R budget units.
"""

from __future__ import annotations

import numpy as np

from twla.solvers.bits.problem import BitCosts, Solution, budget_constraint

MAX_CELLS = 50_000_000


def solve_dp(costs: BitCosts, budget: float, *, max_cells: int = MAX_CELLS) -> Solution:
    """The optimum by dynamic programming over the chain (bit budget only)."""
    if costs.resources:
        raise ValueError(
            "the chain DP supports only the mean-bits budget; extra resource constraints need "
            "the cp-sat, scip, milp or cvxpy solver"
        )
    use, cap = budget_constraint(costs, budget)
    L, K = costs.units, costs.options
    cells = L * K * (cap + 1)
    if cells > max_cells:
        raise ValueError(
            f"the DP table would have {cells:,} cells (budget of {cap:,} integer units); "
            "use the cp-sat or milp solver, or budget weights with a coarser common unit"
        )
    width = cap + 1
    value = np.full((K, width), np.inf)
    for k in range(K):
        if use[0, k] <= cap:
            value[k, use[0, k]] = costs.unary[0, k]
    back = np.zeros((L, K, width), dtype=np.int16)
    for ell in range(1, L):
        step = value[:, None, :] + costs.beta * costs.pairwise[ell - 1][:, :, None]  # (k', k, r)
        prev = step.argmin(0)
        best = np.take_along_axis(step, prev[None], 0)[0]
        value = np.full((K, width), np.inf)
        for k in range(K):
            a = use[ell, k]
            if a <= cap:
                value[k, a:] = best[k, : width - a] + costs.unary[ell, k]
                back[ell, k, a:] = prev[k, : width - a]
    k, r = np.unravel_index(np.argmin(value), value.shape)
    choice = np.empty(L, dtype=np.int64)
    for ell in range(L - 1, -1, -1):
        choice[ell] = k
        k, r = back[ell, k, r], r - use[ell, k]
    return Solution(choice, "optimal", float(costs.objective(choice)))
