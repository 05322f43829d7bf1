"""Integration on the real default model, SmolLM2-135M.

Quantizing all 30 decoder blocks takes minutes on 2 CPU cores (the main job does that), so these
tests quantize the model's first blocks with its real weights and calibration text and leave the
later blocks in full precision: the perplexity of the whole model stays meaningful and shows what
the quantized blocks lose.
"""

import math
from dataclasses import replace

import pytest
import torch

from tests.helpers import first_blocks
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

pytestmark = pytest.mark.slow
BLOCKS = 4  # decoder blocks quantized


@pytest.fixture(scope="module")
def data(smollm2):
    _, tokenizer = smollm2
    calib = calibration_windows(tokenize(tokenizer, load_text("emma")), 8, 256, seed=0)
    windows = evaluation_windows(tokenize(tokenizer, load_text("prideprejudice")), 256, max_tokens=1024)
    return calib, windows


def quantized(config: QuantConfig, calib):
    """A fresh SmolLM2 with its first blocks quantized by ``config``, and the report."""
    model, _ = load_model("smollm2-135m")
    with first_blocks(model):
        _, report = quantize(model, config, calib, device="cpu", progress=False)
    return model, report


@pytest.fixture(scope="module")
def reference_ppl(smollm2, data) -> dict[str, float]:
    """Perplexity of the full-precision model and of absmean (BitNet b1.58) ternary blocks."""
    model, _ = smollm2
    calib, windows = data
    absmean, _ = quantized(QuantConfig.from_method("absmean"), calib)
    return {
        "fp": perplexity(model, windows, device="cpu").ppl,
        "absmean": perplexity(absmean, windows, device="cpu").ppl,
    }


@pytest.mark.parametrize("spec", ["pt2+gptq", "e2m+gptq"])
def test_error_compensated_ternary_beats_absmean_on_real_model(spec, data, reference_ppl):
    calib, windows = data
    model, _ = quantized(QuantConfig.from_method(spec), calib)
    ppl = perplexity(model, windows, device="cpu").ppl
    print(f"{spec}: {ppl:.1f}, {reference_ppl}")
    assert math.isfinite(ppl) and reference_ppl["fp"] < ppl < reference_ppl["absmean"] / 10


@pytest.fixture(scope="module")
def unrotated_a4_ppl(data) -> float:
    calib, windows = data
    model, _ = quantized(QuantConfig.from_method("e2m+gptq+a4"), calib)
    return perplexity(model, windows, device="cpu").ppl


@pytest.mark.parametrize("rotation", ["had", "kotms"])
def test_rotations_rescue_4_bit_activations_on_real_model(rotation, data, unrotated_a4_ppl):
    calib, windows = data
    model, report = quantized(QuantConfig.from_method(f"e2m+gptq+{rotation}+a4"), calib)
    ppl = perplexity(model, windows, device="cpu").ppl
    print(f"{rotation}: {ppl:.1f}, unrotated: {unrotated_a4_ppl:.1f}")
    assert ppl < unrotated_a4_ppl / 3
    if rotation == "kotms":
        for shaping in report.rotation.sites.values():
            assert shaping.losses[-1] < shaping.losses[0]
            assert sum(shaping.fit_error_after) < sum(shaping.fit_error_before)


def test_mixed_precision_activations_on_real_model(smollm2, data, tmp_path):
    _, tokenizer = smollm2
    calib, windows = data
    cfg = QuantConfig.from_method("e2m+had+amp")
    cfg = replace(cfg, allocation=replace(cfg.allocation, samples=1, seqlen=128))
    model, report = quantized(cfg, calib)
    al = report.allocation
    print(al.allocation.bits, al.measured, al.uniform, al.agreement)
    assert al.allocation.status == "optimal" and al.allocation.mean_bits <= 4 + 1e-9
    s = al.costs.unary  # options 2, 4, 6, 8 (the reference)
    assert (s[:, 0] > s[:, 1]).all() and (s[:, 1] > s[:, 2]).mean() > 0.9 and (s[:, 3] == 0).all()
    assert al.agreement["spearman"] > 0.8  # the Fisher estimate orders the measured costs
    assert al.measured <= 1.1 * al.uniform["measured"]  # no worse than uniform 4 bits on calibration
    ppl = perplexity(model, windows, device="cpu").ppl
    assert math.isfinite(ppl) and ppl < 1000
    # the quantized blocks as a model of their own, packed (mixed per-layer bits, rotations), saved
    # and loaded back, give the same outputs
    with first_blocks(model):
        blocks_ppl = perplexity(model, windows, device="cpu").ppl
        save_packed(pack_model(model, report.weights), tokenizer, str(tmp_path / "amp"), method="e2m+had+amp")
    loaded, _, meta = load_packed(str(tmp_path / "amp"))
    assert {spec["act_bits"] for spec in meta["linears"].values()} == set(al.allocation.bits)
    assert perplexity(loaded, windows, device="cpu").ppl == pytest.approx(blocks_ppl, rel=1e-6)
    assert meta["bits"]["bits_per_weight"] < 2.3


def test_packed_smollm2_through_transformers_generates_what_load_packed_does(smollm2, data, tmp_path):
    """``import twla`` + ``AutoModelForCausalLM.from_pretrained`` on a packed SmolLM2 (its first
    blocks quantized, as a model of their own): the tokens of twla.load_packed and of the
    fake-quantized model, for a chat prompt."""
    from transformers import AutoModelForCausalLM

    from twla.evaluate.generation import encode_prompt

    _, tokenizer = smollm2
    calib, _ = data
    model, report = quantized(QuantConfig.from_method("pt2+gptq+ssr+had+a4"), calib)
    ids = encode_prompt(tokenizer, "What is the capital of France?")
    with first_blocks(model):
        fake = model.generate(ids, attention_mask=ids.ne(-1), max_new_tokens=16, do_sample=False)
        save_packed(
            pack_model(model, report.weights), tokenizer, str(tmp_path / "w158a4"), method="pt2+gptq+ssr+had+a4"
        )
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "w158a4"))
    reference, _, _ = load_packed(str(tmp_path / "w158a4"))
    out = hf.generate(ids, attention_mask=ids.ne(-1), max_new_tokens=16, do_sample=False)
    assert torch.equal(out, reference.generate(ids, attention_mask=ids.ne(-1), max_new_tokens=16, do_sample=False))
    assert torch.equal(out, fake)
