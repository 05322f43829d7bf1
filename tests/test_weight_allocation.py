"""Weight mixed precision: stored bits known before quantizing, measured costs, the allocation wired
into the pipeline, and the inputs it refuses."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers import tiny_llama
from twla import InfeasibleBudgetError, QuantConfig, quantize
from twla.bench.rows import MethodRow
from twla.bench.run import scheme
from twla.bench.tables import weight_allocation_table
from twla.models.adapters import get_adapter
from twla.quantization.accounting import count_bits
from twla.quantization.sections import TernaryConfig, UniformConfig, WeightAllocationConfig
from twla.quantization.weight_allocation import candidate, format_config, weight_units
from twla.quantization.weights import TernaryWeight, UniformWeight, quantize_weight, stored_bits

FAST = dict(samples=4, seqlen=32, stride=2)


def wmix(spec: str = "pt2+gptq+had+a4+wmix", **allocation) -> QuantConfig:
    return QuantConfig.from_method(spec, {"weight_allocation": {**FAST, **allocation}})


@pytest.mark.parametrize(
    "cfg",
    [
        TernaryConfig(),
        TernaryConfig(quantizer="absmean", refit=False, block_size=32),
        TernaryConfig(reorder=True, block_size=48),
        UniformConfig(bits=2),
        UniformConfig(bits=3, block_size=40, compensate=True),
        UniformConfig(bits=4, reorder=True, compensate=True, block_size=32),
    ],
)
def test_stored_bits_are_known_before_quantizing(cfg):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(24, 100, generator=gen, dtype=torch.float64)
    X = torch.randn(400, 100, generator=gen, dtype=torch.float64)
    weight, _ = quantize_weight(W, X.T @ X / 400, cfg)
    assert weight.is_reordered() == cfg.reorder  # a random weight's SSR order is never the identity
    assert stored_bits(cfg, (24, 100)) == weight.code_bits() + weight.side_bits()


def test_formats_follow_the_method():
    base = TernaryConfig(block_size=64, damp=0.05)
    assert format_config("ternary", base) is base
    assert format_config("int3", base) == UniformConfig(bits=3, block_size=64, compensate=True, damp=0.05)


def test_candidate_is_quantized_in_the_rotated_basis():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    R1, R2 = (torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0] for _ in range(2))
    R = torch.kron(R1, R2)
    for cfg in (UniformConfig(bits=3, block_size=8), TernaryConfig()):
        W_hat = candidate(W, cfg, (R1, R2))
        assert torch.allclose(W_hat @ R, candidate(W @ R, cfg, None), atol=1e-10)
        assert not torch.allclose(W_hat, candidate(W, cfg, None), atol=1e-3)


def test_the_allocation_meets_the_budget_and_each_linear_is_quantized_in_its_format(calib_ids):
    low, high = (quantize(tiny_llama(), wmix(budget=b), calib_ids, device="cpu", progress=False) for b in (2.6, 3.4))
    for (model, report), budget in ((low, 2.6), (high, 3.4)):
        wa = report.weight_allocation
        assert wa.stored_bits <= budget and wa.allocation.status == "optimal"
        assert count_bits(model, get_adapter(model), report.weights).storage_bits_per_weight == pytest.approx(
            wa.stored_bits
        )
        for name, option in wa.formats.items():
            weight = report.weights[name]
            if option == "ternary":
                assert isinstance(weight, TernaryWeight)
            else:
                assert isinstance(weight, UniformWeight) and weight.bits == int(option[3:])
        assert wa.predicted == pytest.approx(wa.costs.unary[np.arange(len(wa.units)), wa.choice].sum())
        assert np.all(wa.costs.unary[:, 0] > 0)  # ternary always costs; int4 may be lost in rounding noise
        assert np.all(wa.costs.unary[:, 0] > wa.costs.unary[:, 2])  # ternary costs more than int4, linear by linear
        assert report.to_dict()["weight_allocation"]["formats"] == wa.formats
    assert high[1].weight_allocation.predicted < low[1].weight_allocation.predicted
    assert low[1].weight_allocation.counts() != high[1].weight_allocation.counts()
    assert scheme(wmix()) == "W1.58/3/4A4"


def test_a_measured_cost_is_a_full_forward_pass_with_that_linear_alone_quantized(calib_ids):
    model = tiny_llama(num_hidden_layers=2)
    reference = tiny_llama(num_hidden_layers=2)
    reference.load_state_dict(model.state_dict())
    _, report = quantize(model, wmix("pt2+gptq+wmix", budget=3.0), calib_ids, device="cpu", progress=False)
    wa = report.weight_allocation
    windows, pos = calib_ids[:4, :32], torch.arange(1, 31, 2)
    with torch.no_grad():
        ref_logp = reference(windows, use_cache=False).logits[:, pos].float().log_softmax(-1)
        unit = 5  # one linear of the second layer, as int3
        linear = reference.get_submodule(wa.units[unit].name)
        linear.weight.copy_(candidate(linear.weight, UniformConfig(bits=3, compensate=True), None))
        logp = reference(windows, use_cache=False).logits[:, pos].float().log_softmax(-1)
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    assert kl == pytest.approx(wa.costs.unary[unit, 1], rel=1e-4)


def test_weight_allocation_round_trips_and_reads_older_configurations():
    cfg = wmix(budget=2.8, options=("ternary", "int2", "int4"), solver="cp-sat")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    old = QuantConfig.from_method("pt2+gptq+had+a4").to_dict()
    old.pop("weight_allocation")
    assert QuantConfig.from_dict({**old, "version": 5}).weight_allocation is None


def test_bad_weight_allocations_are_refused_before_any_work(calib_ids):
    with pytest.raises(InfeasibleBudgetError, match="every linear in its cheapest format stores"):
        quantize(tiny_llama(), wmix(budget=1.9), calib_ids, progress=False)
    with pytest.raises(ValueError, match="distinct formats"):
        WeightAllocationConfig(options=("ternary", "int5"))
    with pytest.raises(ValueError, match="distinct formats"):
        WeightAllocationConfig(options=("int3", "int3"))
    with pytest.raises(ValueError, match="stored-bits budget"):
        WeightAllocationConfig(solver="dp")
    with pytest.raises(ValueError, match="positive number of bits"):
        WeightAllocationConfig(budget=float("nan"))
    with pytest.raises(ValueError, match="plain ternary weights with integer ones"):
        QuantConfig.from_method("rtn4+gptq+wmix")
    with pytest.raises(ValueError, match="plain ternary weights with integer ones"):
        QuantConfig.from_method("pt2+gptq+sal+wmix")
    with pytest.raises(ValueError, match="learned rounding"):
        QuantConfig.from_method("pt2+gptq+wmix+round")
    assert not wmix().streamable and QuantConfig.from_method("pt2+gptq").streamable
    with pytest.raises(ValueError, match="cannot stream layers"):
        quantize(tiny_llama(), wmix(), calib_ids, progress=False, stream=object())
    with pytest.raises(ValueError, match="too short"):
        quantize(tiny_llama(), wmix(seqlen=64, stride=32), calib_ids, progress=False)


def test_weight_allocation_table_counts_formats_per_linear_type(calib_ids):
    model, report = quantize(
        tiny_llama(num_hidden_layers=2), wmix("pt2+gptq+wmix", budget=3.0), calib_ids, progress=False
    )
    row = MethodRow("pt2+gptq+wmix", "W1.58/3/4A16", "none", 1.0, 16, 3.0, 3.0, 1.0, 1.0)
    row = replace(row, weight_allocation=report.weight_allocation.to_dict())
    table = weight_allocation_table([row])
    counts = report.weight_allocation.counts()
    assert f"{report.weight_allocation.stored_bits:.3f} (3)" in table
    assert ", ".join(f"{o}: {n}" for o, n in counts.items()) in table
    assert "down_proj " in table and len(weight_units(model, get_adapter(model))) == sum(counts.values())
