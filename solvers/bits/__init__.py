"""ILA-AMP's activation bit allocation: the problem, and its solvers.

- :mod:`.problem`: :class:`BitCosts` (options, unary and adjacent pairwise costs, budget
  weights, β, extra resources), :class:`Allocation`, validation and integer forms.
- :mod:`.dp`: the exact chain dynamic program.
- :mod:`.cpsat`: OR-Tools CP-SAT.
- :mod:`.milp`: one MILP formulation for SciPy ``milp`` (HiGHS), OR-Tools SCIP and CVXPY
  (boolean MILP, LP relaxation + rounding).
- :mod:`.heuristics`: greedy and brute force (the test oracle).
- :mod:`.solve`: :func:`solve_bits`, the entry point.
"""

from twla.solvers.bits.problem import Allocation, BitCosts, InfeasibleBudgetError, Resource, SolverTimeLimit
from twla.solvers.bits.solve import EXACT_SOLVERS, SOLVERS, solve_bits

__all__ = [
    "EXACT_SOLVERS",
    "SOLVERS",
    "Allocation",
    "BitCosts",
    "InfeasibleBudgetError",
    "Resource",
    "SolverTimeLimit",
    "solve_bits",
]
