"""Solver benchmark: time to optimum and optimality gap per solver on synthetic chains.

Synthetic costs mimic measured ones: s_ℓ(b) = a_ℓ·4^{(b_ref − b)}·s₀ with a_ℓ
log-normal (noise variance ∝ 2^{−2b}), 0 at the reference; interactions
c_ℓ(b, b') = ρ_ℓ·√(s_ℓ(b)·s_{ℓ+1}(b')) with ρ_ℓ ~ U(−0.5, 1); budget weights cycle like a
Llama block's input sites (576, 576, 576, 1536). Run: ``twla solvers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from twla.solvers.bits.problem import BitCosts
from twla.solvers.bits.solve import EXACT_SOLVERS, SOLVERS, solve_bits

SITE_WIDTHS = (576, 576, 576, 1536)
DEFAULT_SIZES = (8, 30, 120, 480)
BRUTE_FORCE_UNITS = 10  # 4^10 ≈ 10⁶ allocations


def synthetic_costs(
    units: int, *, seed: int = 0, options: Sequence[int] = (2, 4, 6, 8), reference: int = 8, beta: float = 0.5
) -> BitCosts:
    """A random chain instance shaped like measured activation-bit costs."""
    rng = np.random.default_rng(seed)
    bits = np.array(options)
    scale = rng.lognormal(0.0, 1.0, units)[:, None]
    unary = 1e-3 * scale * 4.0 ** (reference - bits[None, :] - 4) * (bits[None, :] != reference)
    rho = rng.uniform(-0.5, 1.0, (units - 1, 1, 1))
    pairwise = rho * np.sqrt(unary[:-1, :, None] * unary[1:, None, :])
    weights = np.resize(np.array(SITE_WIDTHS, dtype=np.float64), units)
    return BitCosts(bits, unary, pairwise, weights, beta)


def benchmark(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    solvers: Sequence[str] = tuple(SOLVERS),
    budget: float = 4.0,
    beta: float = 0.5,
    seed: int = 0,
    time_limit: float = 60.0,
) -> list[dict]:
    """One row per (size, solver): seconds, objective, gap to the best exact objective, status."""
    rows = []
    for name in solvers:  # warm-up: imports and first-call setup are not timed
        solve_bits(synthetic_costs(3, seed=seed), budget, solver=name)
    for size in sizes:
        costs = synthetic_costs(size, seed=seed + size, beta=beta)
        results = {}
        for name in solvers:
            if name == "brute-force" and size > BRUTE_FORCE_UNITS:
                continue
            options = {"time_limit": time_limit} if name in ("cp-sat", "scip", "milp", "cvxpy") else {}
            results[name] = solve_bits(costs, budget, solver=name, **options)  # seconds include building the model
        best = min(a.objective for n, a in results.items() if n in EXACT_SOLVERS and a.status == "optimal")
        for name, a in results.items():
            rows.append(
                {
                    "units": size,
                    "solver": name,
                    "seconds": a.seconds,
                    "objective": a.objective,
                    "excess": (a.objective - best) / abs(best) if best else a.objective - best,
                    "bound": a.bound,
                    "status": a.status,
                    "mean_bits": a.mean_bits,
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| units | solver | seconds | objective | excess over optimum | proven bound | status | mean bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = "–" if r["bound"] is None else f"{r['bound']:.6g}"
        lines.append(
            f"| {r['units']} | {r['solver']} | {r['seconds']:.3f} | {r['objective']:.6g} | {r['excess']:.2e} "
            f"| {bound} | {r['status']} | {r['mean_bits']:.3f} |"
        )
    return "\n".join(lines)
