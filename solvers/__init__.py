"""Optimization problems inside TWLA, each with explicit, interchangeable solvers.

- :mod:`twla.solvers.ternary`: per-row asymmetric ternary fits Ŵ = diag(α)T + μ1ᵀ
  (absmean, TWN, ITF, and the exact S-metric refit).
- :mod:`twla.solvers.gptq`: block-wise GPTQ error compensation, which turns any
  block fit into a layer-output-aware quantizer.
"""
