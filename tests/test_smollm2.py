"""Integration on the real default model, SmolLM2-135M (short calibration and evaluation)."""

import math
from dataclasses import replace

import pytest
import torch

from twla import (
    QuantConfig,
    calibration_windows,
    evaluation_windows,
    load_model,
    load_packed,
    load_text,
    pack_model,
    perplexity,
    quantize,
    save_packed,
    tokenize,
)


def test_error_compensated_ternary_beats_absmean_on_real_model(smollm2):
    model, tokenizer = smollm2
    calib = calibration_windows(tokenize(tokenizer, load_text("emma")), 8, 256, seed=0)
    windows = evaluation_windows(tokenize(tokenizer, load_text("prideprejudice")), 256, max_tokens=2048)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ppl = {"fp": perplexity(model, windows, device="cpu").ppl}
    try:
        for spec in ("absmean", "pt2+gptq", "e2m+gptq"):
            model.load_state_dict(original)
            quantize(model, QuantConfig.from_method(spec), calib, "cpu", progress=False)
            ppl[spec] = perplexity(model, windows, device="cpu").ppl
    finally:
        model.load_state_dict(original)
    print(ppl)
    assert ppl["fp"] < ppl["e2m+gptq"] < ppl["absmean"]
    assert ppl["fp"] < ppl["pt2+gptq"] < ppl["absmean"]
    assert torch.isfinite(torch.tensor(list(ppl.values()))).all()


def test_rotations_rescue_4_bit_activations_on_real_model(smollm2):
    _, tokenizer = smollm2
    calib = calibration_windows(tokenize(tokenizer, load_text("emma")), 8, 256, seed=0)
    windows = evaluation_windows(tokenize(tokenizer, load_text("prideprejudice")), 256, max_tokens=2048)
    ppl, reports = {}, {}
    for spec in ("e2m+gptq+a4", "e2m+gptq+had+a4", "e2m+gptq+kotms+a4"):
        model, _ = load_model("smollm2-135m")
        _, reports[spec] = quantize(model, QuantConfig.from_method(spec), calib, "cpu", progress=False)
        ppl[spec] = perplexity(model, windows, device="cpu").ppl
    print(ppl)
    assert ppl["e2m+gptq+had+a4"] < ppl["e2m+gptq+a4"] / 3
    assert ppl["e2m+gptq+kotms+a4"] < ppl["e2m+gptq+a4"] / 3
    for shaping in reports["e2m+gptq+kotms+a4"].rotation.sites.values():
        assert shaping.losses[-1] < shaping.losses[0]
        assert sum(shaping.fit_error_after) < sum(shaping.fit_error_before)


def test_mixed_precision_activations_on_real_model(smollm2, tmp_path):
    _, tokenizer = smollm2
    calib = calibration_windows(tokenize(tokenizer, load_text("emma")), 8, 256, seed=0)
    windows = evaluation_windows(tokenize(tokenizer, load_text("prideprejudice")), 256, max_tokens=2048)
    cfg = QuantConfig.from_method("e2m+gptq+had+amp")
    cfg = replace(cfg, allocation=replace(cfg.allocation, samples=1, seqlen=128))
    model, _ = load_model("smollm2-135m")
    _, report = quantize(model, cfg, calib, "cpu", progress=False)
    al = report.allocation
    print(al.allocation.bits, al.measured, al.uniform, al.agreement)
    assert al.allocation.status == "optimal" and al.allocation.mean_bits <= 4 + 1e-9
    s = al.costs.unary  # options 2, 4, 6, 8 (the reference)
    assert (s[:, 0] > s[:, 1]).all() and (s[:, 1] > s[:, 2]).mean() > 0.9 and (s[:, 3] == 0).all()
    assert al.agreement["spearman"] > 0.8  # the Fisher estimate orders the measured costs
    assert al.measured <= 1.1 * al.uniform["measured"]  # no worse than uniform 4 bits on calibration
    ppl = perplexity(model, windows, device="cpu").ppl
    assert math.isfinite(ppl) and ppl < 1000
    # the packed checkpoint (mixed per-layer bits, rotations) evaluates to the same perplexity
    save_packed(pack_model(model, report.weights), tokenizer, str(tmp_path / "amp"), "e2m+gptq+had+amp")
    loaded, _, meta = load_packed(str(tmp_path / "amp"))
    assert {spec["act_bits"] for spec in meta["linears"].values()} == set(al.allocation.bits)
    assert perplexity(loaded, windows, device="cpu").ppl == pytest.approx(ppl, rel=1e-6)
    assert meta["bits"]["bits_per_weight"] < 2.3 and meta["bits"]["linear_bytes"] < 0.15 * meta["bits"]["fp16_bytes"]
