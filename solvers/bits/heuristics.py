"""Heuristic and enumerative solvers of the allocation problem.

- greedy: start every unit at its highest option; while over budget, lower the unit whose
  move has the smallest objective increase per budget unit saved; then move single units while the
  budget allows and the objective falls (local search). No bound.
- brute force: enumerate all K^L choices (tiny instances): the test oracle.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from twla.solvers.bits.problem import BitCosts, InfeasibleBudgetError, Solution

MAX_ENUMERATION = 1 << 22


def _moves(costs: BitCosts, choice: np.ndarray) -> np.ndarray:
    """Objective change of moving each unit alone to each option: (L, K)."""
    L = costs.units
    idx = np.arange(L)
    delta = costs.unary - costs.unary[idx, choice][:, None]
    if L > 1:
        left = costs.pairwise[idx[:-1], choice[:-1]]  # (L−1, K): c_{ℓ−1}(k_{ℓ−1}, ·) for units 1..L−1
        delta[1:] += costs.beta * (left - left[idx[:-1], choice[1:]][:, None])
        right = costs.pairwise[idx[:-1], :, choice[1:]]  # (L−1, K): c_ℓ(·, k_{ℓ+1}) for units 0..L−2
        delta[:-1] += costs.beta * (right - right[idx[:-1], choice[:-1]][:, None])
    return delta


def repair(costs: BitCosts, budget: float, choice: np.ndarray) -> np.ndarray:
    """Greedy descent to the budget from ``choice``, then the best feasible single-unit move while it helps."""
    if costs.resources:
        raise ValueError(
            "the greedy solvers (greedy, cvxpy-lp rounding) support only the mean-bits budget, "
            "not extra resource constraints"
        )
    choice = np.array(choice, dtype=np.int64)
    use = costs.weights[:, None] * costs.bits[None, :]
    cap = budget * costs.weights.sum() * (1 + 1e-12)
    idx = np.arange(costs.units)
    while (spent := use[idx, choice].sum()) > cap:
        saved = use[idx, choice][:, None] - use
        ratio = np.where(saved > 0, _moves(costs, choice) / np.where(saved > 0, saved, 1), np.inf)
        ell, k = np.unravel_index(np.argmin(ratio), ratio.shape)
        choice[ell] = k
    while True:
        fits = spent + use - use[idx, choice][:, None] <= cap
        gain = np.where(fits, _moves(costs, choice), 0.0)
        ell, k = np.unravel_index(np.argmin(gain), gain.shape)
        if gain[ell, k] >= -1e-12:
            return choice
        choice[ell] = k
        spent = use[idx, choice].sum()


def greedy_start(costs: BitCosts, budget: float) -> np.ndarray | None:
    """The greedy allocation as a starting point for an exact solver (None with extra resources,
    which greedy does not handle)."""
    return None if costs.resources else solve_greedy(costs, budget).choice


def solve_greedy(costs: BitCosts, budget: float) -> Solution:
    """Greedy from the all-highest-bits allocation."""
    start = np.full(costs.units, int(np.argmax(costs.bits)))
    return Solution(repair(costs, budget, start), "heuristic")


def solve_brute_force(costs: BitCosts, budget: float, *, max_assignments: int = MAX_ENUMERATION) -> Solution:
    """The optimum by enumeration (K^L ≤ ``max_assignments``); handles extra resources."""
    L, K = costs.units, costs.options
    if K**L > max_assignments:
        count = f"{K**L:,}" if L * math.log10(K) < 16 else f"about 10^{L * math.log10(K):.0f}"
        raise ValueError(
            f"brute force would enumerate {K}^{L} = {count} allocations (limit {max_assignments:,}); use dp"
        )
    best, best_value = None, np.inf
    chunk = max(1, (1 << 16) // max(1, K ** min(L, 4)))
    head = max(0, L - 4)
    tail = np.array(list(itertools.product(range(K), repeat=L - head)), dtype=np.int64)
    prefixes = itertools.product(range(K), repeat=head)
    while batch := list(itertools.islice(prefixes, chunk)):
        pre = np.array(batch, dtype=np.int64).reshape(len(batch), head)
        cand = np.concatenate([np.repeat(pre, len(tail), 0), np.tile(tail, (len(batch), 1))], axis=1)
        value = np.where(costs.feasible(cand, budget), costs.objective(cand), np.inf)
        i = int(np.argmin(value))
        if value[i] < best_value:
            best, best_value = cand[i].copy(), value[i]
    if best is None:
        raise InfeasibleBudgetError("no allocation satisfies the budget and the extra resource limits")
    return Solution(best, "optimal", float(best_value))
