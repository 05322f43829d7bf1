"""The notebooks run top to bottom in their quick setting (TWLA_NB_QUICK=1: every cell takes seconds),
and what each one shows still holds: a cell appended to each checks its key results in its kernel."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CHECKS = {
    "solver_tradeoffs.ipynb": """
exact = [r for r in rows if r["solver"] in EXACT_SOLVERS and r["status"] == "optimal"]
assert exact and all(abs(r["excess"]) < 1e-6 for r in exact), exact  # exact solvers reach the optimum
for size in SIZES:  # the LP relaxation bounds the optimum from below
    c = synthetic_costs(size, seed=size)
    assert twla.solve_bits(c, 4.0, solver="cvxpy-lp").bound <= twla.solve_bits(c, 4.0, solver="dp").objective + 1e-9
for beta in (0.0, 0.5, 1.0):  # more bits never cost more: the frontier is monotone
    values = [twla.solve_bits(replace(costs, beta=beta), b).objective for b in budgets]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:], strict=False)), values
""",
    "ila_costs.ipynb": """
assert blocks.allocation.mean_bits <= alloc_cfg.budget + 1e-9
assert sites.costs.units == len(adapter.sites) * blocks.costs.units
for rep in (blocks, sites):  # fewer activation bits cost more, on average over the units
    unary = rep.costs.unary
    assert all(unary[:, k].mean() > unary[:, k + 1].mean() for k in range(unary.shape[1] - 1)), unary.mean(0)
assert fisher.passes == 2 and fisher.allocation.mean_bits <= alloc_cfg.budget + 1e-9  # only the outcome is measured
""",
    "kotms_rotations.ipynb": """
for label in ("riemannian-adam", "riemannian-sgd", "cayley-adam", "riemannian-adam from Hadamard"):
    res, _ = results[label]
    assert res.losses[-1] < res.losses[0], label  # the solvers lower the tri-modal loss
    for R in (res.R1, res.R2):  # and stay on the Stiefel manifold
        eye = torch.eye(R.shape[-1], dtype=R.dtype).expand_as(R)
        assert torch.allclose(R @ R.transpose(-1, -2), eye, atol=1e-4), label
""",
    "ternary_fits.ipynb": """
for name in ("absmean", "twn", "itf lsq (PT²)", "itf twn (TWLA)"):  # the metric refit never hurts
    plain = output_error(Wb, fits[name].dequantize(), Sb)
    assert output_error(Wb, fits[name + " + refit"].dequantize(), Sb) <= plain * (1 + 1e-9), name
errors = {spec: ex for spec, _, ex in rows}
assert errors["absmean+gptq"] < errors["absmean"] and errors["pt2+gptq"] < errors["pt2"]  # GPTQ helps
assert errors["pt2"] < errors["absmean"]  # PT²-LLM's fit beats BitNet's absmean
""",
}


def test_every_notebook_has_its_checks():
    assert sorted(CHECKS) == [p.name for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_its_results_hold(path, smollm2, monkeypatch):
    monkeypatch.setenv("TWLA_NB_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError at the first cell (or check) that fails, CellTimeoutError after 600 s
