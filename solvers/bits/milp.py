"""Mixed-integer linear formulation of the allocation problem and its MILP/LP solvers.

Variables: one-hot x_{ℓ,k} ∈ {0,1} and pair variables y_{ℓ,k,k'} ∈ {0,1} with

    Σ_k x_{ℓ,k} = 1,   Σ_{k'} y_{ℓ,k,k'} = x_{ℓ,k},   Σ_k y_{ℓ,k,k'} = x_{ℓ+1,k'}

(marginal consistency forces y = x_ℓ x_{ℓ+1}ᵀ for integral x and keeps the LP tight), objective
Σ s·x + β Σ c·y, budget Σ w_ℓ b_k x_{ℓ,k} ≤ B Σ w, and any extra resource rows. Backends: SciPy
``milp`` (HiGHS), OR-Tools MIP with SCIP, CVXPY (boolean MILP, or the LP relaxation + rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from twla.solvers.bits.heuristics import greedy_start, repair
from twla.solvers.bits.problem import BitCosts, Deadline, InfeasibleBudgetError, Solution

if TYPE_CHECKING:
    from scipy import sparse


@dataclass(frozen=True)
class Formulation:
    """min cᵀz s.t. A_eq z = b_eq, A_ub z ≤ b_ub, z ∈ {0,1}ⁿ; the first L·K entries of z are x."""

    c: np.ndarray
    A_eq: sparse.csr_matrix
    b_eq: np.ndarray
    A_ub: sparse.csr_matrix
    b_ub: np.ndarray
    units: int
    options: int

    def choice(self, z: np.ndarray) -> np.ndarray:
        """Option indices from a (possibly fractional) solution: the largest x per unit."""
        return np.asarray(z[: self.units * self.options]).reshape(self.units, self.options).argmax(1)

    def point(self, choice: np.ndarray) -> np.ndarray:
        """The 0/1 vector z (x, then y = x_ℓ x_{ℓ+1}ᵀ) of option indices ``choice``."""
        L, K = self.units, self.options
        x = np.zeros((L, K))
        x[np.arange(L), choice] = 1.0
        return np.concatenate([x.ravel(), (x[:-1, :, None] * x[1:, None, :]).ravel()])


def formulate(costs: BitCosts, budget: float) -> Formulation:
    from scipy import sparse

    L, K = costs.units, costs.options
    nx, ny = L * K, (L - 1) * K * K
    x = np.arange(nx).reshape(L, K)
    y = nx + np.arange(ny).reshape(L - 1, K, K)
    rows, cols, vals = [], [], []
    row = 0
    for ell in range(L):  # one-hot
        rows += [row] * K
        cols += x[ell].tolist()
        vals += [1.0] * K
        row += 1
    for ell in range(L - 1):  # marginal consistency with units ℓ and ℓ+1
        for k in range(K):
            rows += [row] * (K + 1)
            cols += y[ell, k, :].tolist() + [x[ell, k]]
            vals += [1.0] * K + [-1.0]
            row += 1
            rows += [row] * (K + 1)
            cols += y[ell, :, k].tolist() + [x[ell + 1, k]]
            vals += [1.0] * K + [-1.0]
            row += 1
    A_eq = sparse.csr_matrix((vals, (rows, cols)), shape=(row, nx + ny))
    b_eq = np.zeros(row)
    b_eq[:L] = 1.0
    ub_rows = [np.outer(costs.weights, costs.bits).ravel()] + [r.coeffs.ravel() for r in costs.resources]
    A_ub = sparse.hstack([sparse.csr_matrix(np.array(ub_rows)), sparse.csr_matrix((len(ub_rows), ny))]).tocsr()
    b_ub = np.array([budget * costs.weights.sum() * (1 + 1e-12)] + [r.limit for r in costs.resources])
    c = np.concatenate([costs.unary.ravel(), costs.beta * costs.pairwise.ravel()])
    return Formulation(c, A_eq, b_eq, A_ub, b_ub, L, K)


def _infeasible() -> InfeasibleBudgetError:
    return InfeasibleBudgetError("no allocation satisfies the budget and the extra resource limits")


def solve_milp(costs: BitCosts, budget: float, *, time_limit: float = 60.0) -> Solution:
    """SciPy ``milp`` (HiGHS branch and cut), within ``time_limit`` seconds of wall time in all."""
    from scipy.optimize import LinearConstraint, milp

    deadline = Deadline(time_limit, "milp", costs.units)
    f = formulate(costs, budget)
    res = deadline.run(
        lambda left: milp(
            f.c,
            integrality=np.ones_like(f.c),
            bounds=(0, 1),
            constraints=[LinearConstraint(f.A_eq, f.b_eq, f.b_eq), LinearConstraint(f.A_ub, -np.inf, f.b_ub)],
            options={"time_limit": left, "mip_rel_gap": 1e-9},
        )
    )
    if res.x is None:
        if res.status == 2:
            raise _infeasible()
        if res.status == 1:
            raise deadline.expired("searching")
        raise RuntimeError(f"scipy milp found no allocation: {res.message}")
    status = "optimal" if res.status == 0 else "time limit"
    return Solution(f.choice(res.x), status, getattr(res, "mip_dual_bound", None))


def solve_scip(costs: BitCosts, budget: float, *, time_limit: float = 60.0) -> Solution:
    """OR-Tools' MIP wrapper with the SCIP backend, started from the greedy allocation (a hint,
    without extra resources),
    within ``time_limit`` seconds of wall time in all."""
    from ortools.linear_solver import pywraplp

    deadline = Deadline(time_limit, "scip", costs.units)
    f = formulate(costs, budget)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        raise RuntimeError("OR-Tools was built without SCIP")
    z = [solver.BoolVar(f"z{i}") for i in range(f.c.size)]
    for A, b, equal in ((f.A_eq, f.b_eq, True), (f.A_ub, f.b_ub, False)):
        for i in range(A.shape[0]):
            if i % 256 == 0:
                deadline.remaining("building its model")
            lo, hi = A.indptr[i], A.indptr[i + 1]
            expr = solver.Sum([float(v) * z[j] for j, v in zip(A.indices[lo:hi], A.data[lo:hi], strict=True)])
            solver.Add(expr == float(b[i]) if equal else expr <= float(b[i]))
    solver.Minimize(solver.Sum([float(ci) * zi for ci, zi in zip(f.c, z, strict=True) if ci != 0]))
    hint = greedy_start(costs, budget)
    if hint is not None:
        solver.SetHint(z, f.point(hint).tolist())
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 1e-9)

    def search(left: float) -> int:
        solver.SetTimeLimit(max(1, int(left * 1000)))
        return solver.Solve(params)

    status = deadline.run(search)
    if status == pywraplp.Solver.INFEASIBLE:
        raise _infeasible()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise deadline.expired(f"searching (status {status})")
    values = np.array([zi.solution_value() for zi in z])
    label = "optimal" if status == pywraplp.Solver.OPTIMAL else "time limit"
    bound = solver.Objective().BestBound()
    return Solution(f.choice(values), label, bound if abs(bound) < 1e19 else None)


def _cvxpy_problem(f: Formulation, boolean: bool):
    import cvxpy as cp

    z = cp.Variable(f.c.size, boolean=boolean)
    constraints = [f.A_eq @ z == f.b_eq, f.A_ub @ z <= f.b_ub]
    if not boolean:
        constraints += [z >= 0, z <= 1]
    return cp.Problem(cp.Minimize(f.c @ z), constraints), z


def solve_cvxpy(costs: BitCosts, budget: float, *, time_limit: float = 60.0) -> Solution:
    """CVXPY boolean MILP (HiGHS backend), within ``time_limit`` seconds of wall time in all.

    CVXPY's compilation cannot be interrupted: when it outlasts the limit, the call returns with
    :class:`SolverTimeLimit` and the abandoned compilation ends with a search of no time."""
    import cvxpy as cp

    deadline = Deadline(time_limit, "cvxpy", costs.units)
    f = formulate(costs, budget)
    problem, z = _cvxpy_problem(f, boolean=True)

    def search(left: float) -> None:
        data, chain, inverse = problem.get_problem_data(cp.HIGHS)
        left = max(deadline.limit - (time.perf_counter() - deadline.start), 1e-3)  # after the compilation
        raw = chain.solve_via_data(problem, data, solver_opts={"time_limit": left, "mip_rel_gap": 1e-9})
        problem.unpack_results(raw, chain, inverse)

    deadline.run(search, "compiling or searching")
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise _infeasible()
    if z.value is None:
        raise deadline.expired(f"searching (status {problem.status})")
    status = "optimal" if problem.status == cp.OPTIMAL else "time limit"
    return Solution(f.choice(z.value), status, problem.value if status == "optimal" else None)


def solve_cvxpy_lp(costs: BitCosts, budget: float) -> Solution:
    """CVXPY LP relaxation (its value is a proven lower bound), rounded to the largest x per unit
    and repaired greedily to the budget."""
    import cvxpy as cp

    f = formulate(costs, budget)
    problem, z = _cvxpy_problem(f, boolean=False)
    problem.solve(solver=cp.HIGHS)
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise _infeasible()
    if z.value is None:
        raise RuntimeError(f"CVXPY found no LP solution (status {problem.status})")
    return Solution(repair(costs, budget, f.choice(z.value)), "rounded", float(problem.value))
