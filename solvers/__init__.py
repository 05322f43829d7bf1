"""Optimization problems inside TWLA, each with explicit, interchangeable solvers.

- :mod:`twla.solvers.ternary`: per-row asymmetric ternary fits Ŵ = diag(α)T + μ1ᵀ
  (absmean, TWN, ITF, and the exact S-metric refit).
- :mod:`twla.solvers.gptq`: block-wise GPTQ error compensation, which turns any
  block fit into a layer-output-aware quantizer.
- :mod:`twla.solvers.kronecker`: Kronecker rotations R₁ ⊗ R₂ applied without forming R,
  factor sizes, Hadamard matrices.
- :mod:`twla.solvers.stiefel`: minimization over pairs of orthogonal factors (geoopt
  Riemannian Adam/SGD on the Stiefel manifold, Cayley-parameterized Adam, fixed).
- :mod:`twla.solvers.kotms`: the tri-modal shaping loss and its batched solver.
- :mod:`twla.solvers.relocation`: E2M stage-2 relocation of a site's rotation against
  its ternarized output error.
- :mod:`twla.solvers.bits`: ILA-AMP's activation bit allocation, ``solve_bits(costs, budget)``
  (chain DP, CP-SAT, SCIP, SciPy milp, CVXPY MILP / LP rounding, greedy, brute force).

Uniform integer quantization (per-token activations, RTN weights) lives with the kernels
whose arithmetic it defines, in :mod:`twla.kernels.uniform`.
"""
