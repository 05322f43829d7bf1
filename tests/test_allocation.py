"""ILA-AMP on a model: measured costs, the Fisher estimate, and the allocation wired into the pipeline."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.helpers import tiny_llama
from twla import InfeasibleBudgetError, QuantConfig, quantize
from twla.bench.plots import plot_cost_predictions
from twla.bench.rows import MethodRow
from twla.bench.run import activation_bits, scheme
from twla.bench.tables import allocation_table
from twla.models.adapters import get_adapter
from twla.quantization.allocation import allocate, allocation_units, uniform_bits
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.sections import AllocationConfig
from twla.solvers.bits.problem import option_index

FAST = dict(samples=4, seqlen=32, stride=2)


def mixed(spec: str = "e2m+gptq+had+amp", **allocation) -> QuantConfig:
    cfg = QuantConfig.from_method(spec)
    return replace(cfg, allocation=replace(cfg.allocation, **{**FAST, **allocation}))


def kl_of_full_forward(model, windows, stride, ref_logp) -> float:
    pos = torch.arange(stride - 1, windows.shape[1] - 1, stride)
    with torch.no_grad():
        logp = model(windows, use_cache=False).logits[:, pos].float().log_softmax(-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def set_bits(model, bits_by_name):
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module.set_act_bits(bits_by_name(name))


def by_layer(bits: dict[int, int]):
    """Bits per decoder-layer index (8 elsewhere) for :func:`set_bits`."""
    return lambda name: bits.get(int(name.split(".")[2]), 8)


def test_measured_costs_match_full_forward_passes(calib_ids):
    model = tiny_llama(num_hidden_layers=3)
    model, report = quantize(model, mixed(), calib_ids, device="cpu", progress=False)
    al = report.allocation
    costs = al.costs
    assert costs.unary.shape == (3, 4) and costs.pairwise.shape == (2, 4, 4)
    assert (
        np.all(costs.unary[:, 3] == 0) and np.all(costs.pairwise[:, 3, :] == 0) and np.all(costs.pairwise[:, :, 3] == 0)
    )
    assert np.all(costs.unary[:, :3] > 0)
    assert np.all(np.diff(costs.unary[:, :3], axis=1) < 0)  # fewer bits cost more
    windows = calib_ids[:4, :32]
    pos = torch.arange(1, 31, 2)
    set_bits(model, lambda name: 8)
    with torch.no_grad():
        ref_logp = model(windows, use_cache=False).logits[:, pos].float().log_softmax(-1)
    # unit 1 at 2 bits, and the pair (1: 2 bits, 2: 4 bits), rerun from scratch
    set_bits(model, by_layer({1: 2}))
    assert kl_of_full_forward(model, windows, 2, ref_logp) == pytest.approx(costs.unary[1, 0], rel=1e-4)
    set_bits(model, by_layer({1: 2, 2: 4}))
    both = kl_of_full_forward(model, windows, 2, ref_logp)
    assert both == pytest.approx(costs.unary[1, 0] + costs.unary[2, 1] + costs.pairwise[1, 0, 1], rel=1e-4)


def test_allocation_is_applied_and_reported(calib_ids):
    model, report = quantize(
        tiny_llama(num_hidden_layers=3), mixed(budget=5.0), calib_ids, device="cpu", progress=False
    )
    al = report.allocation
    assert al.allocation.mean_bits <= 5.0 + 1e-9 and al.allocation.status == "optimal"
    for unit, b in zip(al.units, al.allocation.bits, strict=True):
        for name in unit.linears:
            module = model.get_submodule(name)
            assert module.act.bits == b and module.act.clip == module.act_clips[b]
            assert set(module.act_clips) == {2, 4, 6, 8}
    assert {r.name: r.act_bits for r in report.records} == al.bits
    assert activation_bits(report.records) == pytest.approx(al.allocation.mean_bits)
    assert al.measured == pytest.approx(
        kl_of_full_forward(model, calib_ids[:4, :32], 2, al_ref_logp(model, calib_ids)), rel=1e-4
    )
    assert al.uniform is None and not al.kept_uniform  # uniform 5 bits is not an option
    assert math.isfinite(al.predicted) and report.to_dict()["allocation"]["allocation"]["bits"] == al.allocation.bits
    assert scheme(mixed()) == "W1.58A2-8 mixed"


def al_ref_logp(model, calib_ids):
    saved = {n: m.act.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    set_bits(model, lambda name: 8)
    pos = torch.arange(1, 31, 2)
    with torch.no_grad():
        logp = model(calib_ids[:4, :32], use_cache=False).logits[:, pos].float().log_softmax(-1)
    set_bits(model, lambda name: saved[name])
    return logp


def test_site_granularity_units_and_weights(calib_ids):
    model = tiny_llama()
    units = allocation_units(model, get_adapter(model), "site")
    assert [u.name for u in units[:4]] == ["0.attn_in", "0.attn_out", "0.mlp_in", "0.mlp_out"]
    assert [u.weight for u in units[:4]] == [64, 64, 64, 160]
    blocks = allocation_units(model, get_adapter(model), "block")
    assert len(blocks) == 2 and blocks[0].weight == 64 * 3 + 160 and len(blocks[0].linears) == 7
    model, report = quantize(model, mixed("e2m+had+amp-site", metric="loss"), calib_ids, device="cpu", progress=False)
    al = report.allocation
    assert al.costs.unary.shape == (8, 4) and al.allocation.mean_bits <= 4 + 1e-9
    assert al.uniform["bits"] == 4 and math.isfinite(al.uniform["measured"])


def test_fisher_estimate_tracks_measured_costs(calib_ids):
    _, report = quantize(tiny_llama(num_hidden_layers=3), mixed(), calib_ids, device="cpu", progress=False)
    al = report.allocation
    est = al.estimate
    assert est.shape == (3, 4) and np.all(est[:, 3] == 0) and np.all(est[:, :3] > 0)
    assert np.all(np.diff(est[:, :3], axis=1) < 0)
    assert al.agreement["spearman"] > 0.8 and 0.1 < al.agreement["median_ratio"] < 10


def test_fixed_seed_gives_the_same_allocation(calib_ids):
    runs = [quantize(tiny_llama(), mixed(), calib_ids, device="cpu", progress=False)[1].allocation for _ in range(2)]
    assert runs[0].allocation.bits == runs[1].allocation.bits
    assert np.array_equal(runs[0].costs.unary, runs[1].costs.unary)


def test_beta_zero_measures_no_pairs(calib_ids):
    """β = 0: the pairs would not enter the objective, so only the unary costs are measured."""
    runs = {
        beta: quantize(tiny_llama(num_hidden_layers=3), mixed(beta=beta), calib_ids, device="cpu", progress=False)[
            1
        ].allocation
        for beta in (0.0, 0.5)
    }
    free, paired = runs[0.0], runs[0.5]
    assert np.array_equal(free.costs.unary, paired.costs.unary)
    assert not free.costs.pairwise.any() and paired.costs.pairwise.any()
    unary, pairs = 3 * 3, 2 * 3 * 3  # units × options off the reference 8; adjacent pairs × both off it
    assert paired.passes - free.passes == pairs and free.passes == unary + 2  # + uniform 4 bits, the allocation
    chosen = option_index(free.costs, free.allocation.bits)
    assert free.predicted == pytest.approx(free.costs.unary[np.arange(3), chosen].sum())


def test_fisher_costs_solve_on_the_estimate_and_measure_only_the_outcome(calib_ids, tmp_path):
    """costs="fisher": the program's unary costs are the second-order estimate (the one a measured
    run reports beside its costs), there are no pairs, and the only passes measure the uniform bits
    and the choice; the choice is set on the model."""
    runs = {
        costs: quantize(tiny_llama(num_hidden_layers=3), mixed(costs=costs), calib_ids, device="cpu", progress=False)
        for costs in ("fisher", "measured")
    }
    (model, report), measured = runs["fisher"], runs["measured"][1].allocation
    fisher = report.allocation
    assert fisher.passes == 2 and fisher.agreement is None and fisher.costs.beta == 0
    assert np.array_equal(fisher.costs.unary, fisher.estimate) and not fisher.costs.pairwise.any()
    np.testing.assert_allclose(fisher.costs.unary, measured.estimate, rtol=1e-5)
    chosen = option_index(fisher.costs, fisher.allocation.bits)
    assert fisher.predicted == pytest.approx(fisher.costs.unary[np.arange(3), chosen].sum())
    assert fisher.allocation.mean_bits <= 4 + 1e-9
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    mixed_bits = {n: 2 if ".0." in n else 6 if ".2." in n else 4 for n in fisher.bits}  # block 0 at 2, block 2 at 6
    set_bits(model, mixed_bits.get)
    with uniform_bits(model, get_adapter(model), replace(fisher, bits=mixed_bits)) as uniform:
        assert uniform == 4 and {m.act.bits for m in linears.values()} == {4}
    assert {n: m.act.bits for n, m in linears.items()} == mixed_bits
    bits = {int(name.split(".")[2]): b for name, b in fisher.bits.items()}
    assert {r.act_bits for r in report.records if r.layer == 0} == {bits[0]}
    rows = [
        MethodRow(f"{costs}", "W1.58A2-8 mixed", "had", 1.0, 4, 1.9, 1.9, 1.0, 1.0, allocation=run.allocation.to_dict())
        for costs, (_, run) in runs.items()
    ]
    table = allocation_table(rows).splitlines()
    assert "| fisher | 3 blocks | fisher | dp |" in table[2] and "| – | 2, " in table[2]
    assert "| measured | 3 blocks | measured | dp |" in table[3] and f"{measured.agreement['spearman']:.2f}" in table[3]
    plot_cost_predictions(rows, str(tmp_path / "costs.png"))
    assert (tmp_path / "costs.png").stat().st_size > 0
    data = mixed(costs="fisher").to_dict()
    assert QuantConfig.from_dict(data).streamable
    del data["allocation"]["costs"]  # version 9 had measured costs only
    assert QuantConfig.from_dict({**data, "version": 9}).allocation.costs == "measured"
    fisher_term = QuantConfig.from_method("e2m+amp-fisher").allocation
    assert (fisher_term.granularity, fisher_term.costs, fisher_term.beta) == ("site", "fisher", 0.0)


def test_a_choice_that_measures_worse_than_uniform_bits_is_not_set(calib_ids, monkeypatch):
    """The program's choice is set only when it measures better than every unit at the budget's bits:
    here the program is handed negated costs, so it picks the worst bits it can afford."""
    import twla.quantization.allocation as allocation

    solve = allocation.solve_bits
    monkeypatch.setattr(
        allocation, "solve_bits", lambda c, b, solver: solve(replace(c, unary=-c.unary), b, solver=solver)
    )
    model, report = quantize(tiny_llama(num_hidden_layers=3), mixed(), calib_ids, device="cpu", progress=False)
    al = report.allocation
    assert set(al.allocation.bits) != {4} and al.measured > al.uniform["measured"]
    assert al.kept_uniform and al.mean_bits == 4 and set(al.bits.values()) == {4}
    assert {r.act_bits for r in report.records} == {4} and report.to_dict()["allocation"]["kept_uniform"]
    assert {m.act.bits for m in model.modules() if isinstance(m, QuantLinear)} == {4}
    kl = kl_of_full_forward(model, calib_ids[:4, :32], 2, al_ref_logp(model, calib_ids))
    assert kl == pytest.approx(al.uniform["measured"], rel=1e-4)


def test_allocation_bad_inputs(calib_ids):
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 2"):
        AllocationConfig(budget=1.0)
    with pytest.raises(ValueError, match="unknown bit solver"):
        AllocationConfig(solver="magic")
    with pytest.raises(ValueError, match="not one of"):
        AllocationConfig(options=(2, 5))
    with pytest.raises(ValueError, match="granularity"):
        AllocationConfig(granularity="head")
    with pytest.raises(ValueError, match="unknown allocation costs 'guess'"):
        AllocationConfig(costs="guess")
    with pytest.raises(ValueError, match=r"several choices of allocation granularity \(amp, amp-site\)"):
        QuantConfig.from_method("e2m+amp+amp-site")
    with pytest.raises(ValueError, match="too short"):
        quantize(tiny_llama(), mixed(), calib_ids[:, :2], device="cpu", progress=False)
    model, _ = quantize(tiny_llama(), QuantConfig.from_method("e2m+a4"), calib_ids, device="cpu", progress=False)
    with pytest.raises(ValueError, match="no calibrated clipping ratio"):
        allocate(
            model,
            get_adapter(model),
            calib_ids,
            cfg=AllocationConfig(**FAST),
            device=torch.device("cpu"),
            progress=False,
        )


def test_loss_metric_reference_is_the_reference_loss(calib_ids):
    model, report = quantize(tiny_llama(), mixed(metric="loss"), calib_ids, device="cpu", progress=False)
    set_bits(model, lambda name: 8)
    pos = torch.arange(1, 31, 2)
    windows = calib_ids[:4, :32]
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, pos].float()
    nll = float(F.cross_entropy(logits.flatten(0, 1), windows[:, pos + 1].flatten()))
    assert report.allocation.reference_nll == pytest.approx(nll, rel=1e-5)
