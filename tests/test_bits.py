"""The allocation solvers of ILA-AMP: exact ones agree with brute force, heuristics never beat them."""

import numpy as np
import pytest

from twla import InfeasibleBudgetError, solve_bits
from twla.solvers.bits import EXACT_SOLVERS, SOLVERS, BitCosts, Resource

OPTIONS = np.array([2, 4, 6, 8])


def random_costs(rng, L, K=4, beta=0.5, integer_weights=True) -> BitCosts:
    bits = OPTIONS[:K]
    unary = rng.exponential(1.0, (L, K)) * 2.0 ** (4 - bits)[None]
    pairwise = rng.normal(0.0, 0.5, (L - 1, K, K))  # interactions of both signs
    weights = rng.integers(1, 5, L) if integer_weights else None
    return BitCosts(bits, unary, pairwise, weights, beta)


def test_exact_solvers_agree_with_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    for trial in range(25):
        costs = random_costs(rng, int(rng.integers(1, 8)), K=int(rng.integers(2, 5)))
        budget = float(rng.uniform(costs.bits.min(), costs.bits.max()))
        oracle = solve_bits(costs, budget, solver="brute-force")
        assert oracle.mean_bits <= budget + 1e-9
        for name in SOLVERS:
            got = solve_bits(costs, budget, solver=name)
            assert got.mean_bits <= budget + 1e-9, (trial, name)
            assert got.objective == pytest.approx(costs.objective(np.searchsorted(costs.bits, got.bits)))
            if name in EXACT_SOLVERS:
                assert got.objective == pytest.approx(oracle.objective, rel=1e-7, abs=1e-9), (trial, name)
                assert got.status == "optimal"
            else:
                assert got.objective >= oracle.objective - 1e-9, (trial, name)
            if got.bound is not None:
                assert got.bound <= oracle.objective + 1e-7, (trial, name)


def test_dp_and_cpsat_agree_on_large_instances_and_heuristics_do_not_beat_them():
    rng = np.random.default_rng(1)
    for L in (60, 200):
        costs = random_costs(rng, L)
        dp = solve_bits(costs, 4.0, solver="dp")
        cp = solve_bits(costs, 4.0, solver="cp-sat")
        assert cp.status == "optimal"
        assert cp.objective == pytest.approx(dp.objective, rel=1e-9)
        assert cp.bound <= dp.objective + 1e-9 and cp.gap < 1e-6
        for name in ("greedy", "cvxpy-lp"):
            assert solve_bits(costs, 4.0, solver=name).objective >= dp.objective - 1e-9
        lp = solve_bits(costs, 4.0, solver="cvxpy-lp")
        assert lp.bound <= dp.objective + 1e-7


def test_plain_mapping_with_lists_and_defaults():
    pairs = [[[4, 0], [0, 0]]] * 2  # adjacent units both at 2 bits interact
    costs = {"bits": [2, 4], "unary": [[5.0, 0.0], [1.0, 0.0], [3.0, 0.0]], "pairwise": pairs}
    alloc = solve_bits(costs, 10 / 3)  # weights default to 1: one unit may drop to 2 bits
    assert alloc.bits == [4, 2, 4] and alloc.objective == pytest.approx(1.0)
    assert alloc.mean_bits == pytest.approx(10 / 3) and alloc.status == "optimal"
    two = {**costs, "unary": [[1.0, 0.0], [1.0, 0.0], [4.0, 0.0]]}  # two units at 2 bits
    assert solve_bits(two, 8 / 3).bits == [2, 4, 2]  # beta defaults to 1: avoid the adjacent pair
    assert solve_bits({**two, "beta": 0.0}, 8 / 3).bits == [2, 2, 4]


def test_budget_weights_count_per_unit():
    unary = [[1.0, 0.0], [1.0, 0.0]]
    costs = {"bits": [2, 8], "unary": unary, "pairwise": [[[0, 0], [0, 0]]], "weights": [1, 3]}
    # mean of (2, 8) weighted (1, 3) is 6.5 > 5; (8, 2) gives 3.5: only unit 1 can be lowered
    assert solve_bits(costs, 5.0).bits == [8, 2]
    alloc = solve_bits(costs, 5.0, solver="cp-sat")
    assert alloc.bits == [8, 2] and alloc.mean_bits == pytest.approx(3.5)


def test_infeasible_budget_names_the_smallest_feasible_one():
    costs = random_costs(np.random.default_rng(2), 5)
    for solver in ("dp", "cp-sat", "greedy"):
        with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 2") as info:
            solve_bits(costs, 1.5, solver=solver)
        assert info.value.min_budget == 2
    assert solve_bits(costs, 2.0).bits == [2] * 5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unary": [[1.0, np.nan]] * 3}, "NaN or inf"),
        ({"unary": [[1.0, 2.0, 3.0]] * 3}, "unary must have shape"),
        ({"pairwise": [[[0, 0], [0, 0]]]}, "pairwise must have shape"),
        ({"weights": [1, -1, 1]}, "positive"),
        ({"bits": [4, 4]}, "distinct"),
        ({"bits": [2.5, 4]}, "positive integers"),
        ({"beta": float("inf")}, "beta"),
        ({"costs": 1}, "unknown"),
    ],
)
def test_malformed_costs_raise_clear_errors(change, message):
    costs = {"bits": [2, 4], "unary": [[1.0, 0.0]] * 3, "pairwise": [[[0, 0], [0, 0]]] * 2, **change}
    with pytest.raises(ValueError, match=message):
        solve_bits(costs, 3.0)


def test_bad_solver_budget_and_type():
    costs = random_costs(np.random.default_rng(3), 3)
    with pytest.raises(ValueError, match="unknown solver"):
        solve_bits(costs, 4.0, solver="simplex")
    with pytest.raises(ValueError, match="finite"):
        solve_bits(costs, float("nan"))
    with pytest.raises(TypeError, match="mapping"):
        solve_bits([1, 2], 4.0)
    with pytest.raises(ValueError, match="brute force would enumerate"):
        solve_bits(random_costs(np.random.default_rng(3), 30), 4.0, solver="brute-force")


def test_extra_resources_in_ip_solvers_and_clear_refusal_elsewhere():
    rng = np.random.default_rng(4)
    for trial in range(8):
        base = random_costs(rng, 6)
        latency = Resource(rng.uniform(0.5, 2.0, (6, 4)) * OPTIONS[None], 0.0, "latency")
        lo, hi = latency.coeffs.min(1).sum(), latency.coeffs.max(1).sum()
        latency = Resource(latency.coeffs, float(lo + 0.4 * (hi - lo)), "latency")
        costs = BitCosts(base.bits, base.unary, base.pairwise, base.weights, base.beta, (latency,))
        oracle = solve_bits(costs, 6.0, solver="brute-force")
        for name in ("cp-sat", "scip", "milp", "cvxpy"):
            if name == "cp-sat":  # integer resources for CP-SAT
                ints = Resource(np.round(latency.coeffs * 100), round(latency.limit * 100), "latency")
                costs_i = BitCosts(base.bits, base.unary, base.pairwise, base.weights, base.beta, (ints,))
                got, want = solve_bits(costs_i, 6.0, solver=name), solve_bits(costs_i, 6.0, solver="brute-force")
            else:
                got, want = solve_bits(costs, 6.0, solver=name), oracle
            assert got.objective == pytest.approx(want.objective, rel=1e-7, abs=1e-9), (trial, name)
    for name, message in (("dp", "chain DP supports only"), ("greedy", "greedy solvers"), ("cvxpy-lp", "greedy")):
        with pytest.raises(ValueError, match=message):
            solve_bits(costs, 6.0, solver=name)
    tight = BitCosts(base.bits, base.unary, base.pairwise, base.weights, base.beta, (Resource(latency.coeffs, lo / 2),))
    with pytest.raises(InfeasibleBudgetError, match="latency|resource"):
        solve_bits(tight, 6.0, solver="milp")


def test_cpsat_refuses_irrational_resource_weights_with_advice():
    costs = random_costs(np.random.default_rng(5), 4, integer_weights=False)
    costs = BitCosts(costs.bits, costs.unary, costs.pairwise, np.array([1.0, np.pi, 1.0, 1.0]), costs.beta)
    with pytest.raises(ValueError, match="rational"):
        solve_bits(costs, 4.0, solver="cp-sat")
    assert solve_bits(costs, 4.0, solver="milp").status == "optimal"


def test_single_unit_and_allocation_report():
    alloc = solve_bits({"bits": [2, 4, 8], "unary": [[3.0, 1.0, 0.0]], "pairwise": []}, 4.0)
    assert alloc.bits == [4] and alloc.gap == 0.0 and alloc.to_dict()["solver"] == "dp"
