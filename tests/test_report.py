"""Bench presets and the report's derived tables: ablation pairs and the quality-vs-bits front."""

import pytest

from twla.bench.rows import MethodRow
from twla.bench.run import BenchConfig
from twla.bench.tables import (
    ablation_pairs,
    ablation_table,
    frontier_points,
    frontier_table,
    reconstruction_table,
    rotation_choice_table,
)
from twla.quantization.config import QuantConfig
from twla.quantization.presets import ABLATION_METHODS, DEFAULT_METHOD, FRONTIER_METHODS, resolve_methods
from twla.quantization.sections import UniformConfig


def row(method, ppl, bits=2.293, act=16.0, seeds=()):
    """A report row; ``seeds`` gives per-seed perplexities whose mean is ``ppl``'s stand-in."""
    r = MethodRow(method, "W1.58A16", "none", ppl, act, bits, bits, 0.0, 0.0)
    if seeds:
        mean = sum(seeds) / len(seeds)
        std = (sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1)) ** 0.5
        r.ppl, r.ppl_spread = mean, {"mean": mean, "std": std, "min": min(seeds), "max": max(seeds), "n": len(seeds)}
    return r


def test_presets_expand_in_order_and_every_method_parses():
    assert resolve_methods(("ablation",)) == ABLATION_METHODS and ABLATION_METHODS[0] == DEFAULT_METHOD
    mixed = resolve_methods(("rtn4+had+a4", "default", "e2m+gptq+ssr"))
    assert mixed[0] == "rtn4+had+a4" and len(mixed) == len(set(mixed)) and mixed.count("e2m+gptq+ssr") == 1
    assert BenchConfig(methods=("frontier",)).methods == FRONTIER_METHODS
    for spec in FRONTIER_METHODS + ABLATION_METHODS:
        QuantConfig.from_method(spec)
    uniform = [QuantConfig.from_method(s).weights for s in FRONTIER_METHODS if s.startswith("rtn")]
    assert {(w.bits, w.block_size) for w in uniform if isinstance(w, UniformConfig)} == {
        (b, g) for b in (2, 3, 4) for g in (128, 64)
    }
    with pytest.raises(ValueError, match="more than once"):
        BenchConfig(methods=("e2m", "e2m"))


def test_ablation_pairs_are_one_step_apart():
    rows = [
        row("fp", 25.0, 16.0),
        row("e2m+gptq", 200.0),
        row("e2m+gptq+ssr", 190.0),
        row("e2m+gptq+ssr+recon", 90.0),
        row("pt2+gptq+ssr+recon", 95.0),
        row("e2m+recon", 300.0),
    ]
    pairs = {(a.method, b.method, change) for a, b, change in ablation_pairs(rows)}
    assert pairs == {
        ("e2m+gptq", "e2m+gptq+ssr", "+ssr"),
        ("e2m+gptq+ssr", "e2m+gptq+ssr+recon", "+recon"),
        ("e2m+recon", "e2m+gptq+ssr+recon", "+gptq+ssr"),
        ("e2m+gptq+ssr+recon", "pt2+gptq+ssr+recon", "pt2 instead of e2m"),
    }  # e2m+gptq → e2m+gptq+ssr+recon is not listed: e2m+gptq+ssr lies between


def test_ablation_difference_in_standard_errors():
    rows = [row("e2m+gptq", 0, seeds=(100.0, 110.0, 120.0)), row("e2m+gptq+recon", 0, seeds=(80.0, 82.0, 84.0))]
    # Δ = 82 − 110 = −28; s.e. = sqrt(10²/3 + 2²/3) = 5.888
    assert "| +recon | e2m+gptq | 110.00 ± 10.00 | 82.00 ± 2.00 | -28.00 | -4.8 |" in ablation_table(rows)
    single = ablation_table([row("e2m", 300.0), row("e2m+gptq", 200.0)])
    assert "| +gptq | e2m | 300.00 | 200.00 | -100.00 | – |" in single


def test_frontier_marks_the_pareto_front_per_activation_bits():
    rows = [
        row("fp", 25.0, 16.0),
        row("a", 90.0, 2.29),
        row("b", 95.0, 2.14),
        row("c", 120.0, 2.29),  # more bits than b and worse: dominated
        row("d", 70.0, 2.29, act=4.0),  # alone at A4: on its front
        row("e", 50.0, 4.17, act=4.0),
    ]
    front = {r.method: optimal for r, optimal in frontier_points(rows)}
    assert front == {"fp": True, "a": True, "b": True, "c": False, "d": True, "e": True}
    table = frontier_table(rows).splitlines()
    assert [line.split(" | ")[2] for line in table[2:]] == ["b", "a", "c", "fp", "d", "e"]  # A16 first, then A4


def test_reconstruction_tables_show_the_relative_change():
    recon, e2e = row("pt2+recon", 90.0), row("pt2+recon+e2e", 80.0)
    recon.reconstruction = {"before": 0.2, "after": 0.15, "steps": 42.6, "seconds": 300.0}
    e2e.reconstruction = recon.reconstruction
    e2e.end_to_end = {"before": 0.5, "after": 0.4, "steps": 50, "seconds": 251.0}
    block = reconstruction_table([recon, e2e]).splitlines()
    assert block[2] == "| pt2+recon | 0.2000 | 0.1500 | -25.0 % | 43 | 300 |" and len(block) == 4
    kl = reconstruction_table([recon, e2e], "end_to_end").splitlines()
    assert kl[0].startswith("| method | KL before")
    assert kl[2:] == ["| pt2+recon+e2e | 0.5000 | 0.4000 | -20.0 % | 50 | 251 |"]


def test_rotation_choice_table_counts_the_kept_rotations_and_averages_the_kept_errors():
    kotms, had = row("pt2+kotms+a4", 150.0), row("pt2+had+a4", 140.0)
    errors = {
        "fixed": {"weight": [0.1, 0.3], "activation": [0.01, 0.03], "combined": [0.12, 0.34]},
        "learned": {"weight": [0.1, 0.2], "activation": [0.02, 0.02], "combined": [0.14, 0.22]},
    }
    kotms.shaping = {"mlp_in": {"errors": errors, "learned": [False, True]}}
    had.shaping = {"mlp_in": {"errors": {}, "learned": []}}  # a fixed rotation has nothing to compare
    table = rotation_choice_table([kotms, had]).splitlines()
    assert table[2:] == [
        "| pt2+kotms+a4 | mlp_in | 1 of 2 | 0.2000 → 0.1500 | 0.0200 → 0.0200 | 0.2300 → 0.1800 | 0.1700 |"
    ]


def test_bench_overrides_reach_the_methods_that_use_them():
    cfg = BenchConfig(
        methods=("pt2+recon+e2e", "pt2+had+a4"),
        overrides={"end_to_end": {"steps": 7}, "weights": {"damp": 0.05}},
    )
    e2e, had = cfg.quant_config("pt2+recon+e2e", seed=3), cfg.quant_config("pt2+had+a4")
    assert (e2e.end_to_end.steps, e2e.end_to_end.seed, e2e.reconstruction.steps) == (7, 3, 50)
    assert e2e.weights.damp == had.weights.damp == 0.05 and had.end_to_end is None
    with pytest.raises(ValueError, match="overrides of reconstruction apply to no benched method"):
        BenchConfig(methods=("pt2+e2e",), overrides={"reconstruction": {"steps": 3}})
