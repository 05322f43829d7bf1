import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.helpers import SMALL_CONFIG, tiny_llama
from twla import QuantConfig, quantize
from twla.data.text import bos_token, calibration_windows, check_disjoint, evaluation_windows, load_text
from twla.evaluate.perplexity import perplexity
from twla.models.adapters import get_adapter
from twla.models.loading import keep_layers, load_model
from twla.quantization.accounting import count_bits


def test_quantize_makes_every_linear_ternary_per_block(tiny_model, calib_ids):
    model, report = quantize(tiny_model, QuantConfig.from_method("e2m+gptq"), calib_ids, device="cpu", progress=False)
    assert len(report.records) == 2 * 7
    for name, tw in report.weights.items():
        W = model.get_submodule(name).weight.detach()
        assert torch.allclose(W, tw.dequantize(), atol=1e-6)
        for b in range(tw.alpha.shape[1]):
            cols = tw.perm[b * tw.block_size : (b + 1) * tw.block_size]
            assert max(row.unique().numel() for row in W[:, cols]) <= 3
    down = report.weights["model.layers.0.mlp.down_proj"]
    assert down.alpha.shape == (64, 2)  # 160 inputs: blocks of 128 and 32
    rec = report.records[0]
    assert set(rec.stages) == {"itf", "gptq-round", "refit"} and 0 < rec.output_error < 1


def test_quantization_is_deterministic(calib_ids):
    a, _ = quantize(tiny_llama(), QuantConfig.from_method("pt2+gptq+ssr"), calib_ids, device="cpu", progress=False)
    b, _ = quantize(tiny_llama(), QuantConfig.from_method("pt2+gptq+ssr"), calib_ids, device="cpu", progress=False)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na


def test_compensation_beats_plain_on_tiny_model(calib_ids):
    windows = calib_ids  # the calibration tokens themselves: a fit measure, not a held-out score
    plain, _ = quantize(tiny_llama(), QuantConfig.from_method("pt2"), calib_ids, device="cpu", progress=False)
    comp, _ = quantize(tiny_llama(), QuantConfig.from_method("pt2+gptq"), calib_ids, device="cpu", progress=False)
    fp = tiny_llama()
    ref = fp(windows).logits
    err_plain = (plain(windows).logits - ref).pow(2).mean()
    err_comp = (comp(windows).logits - ref).pow(2).mean()
    assert err_comp < err_plain


def test_bit_accounting(tiny_model, calib_ids):
    model, report = quantize(
        tiny_model, QuantConfig.from_method("e2m+gptq+ssr"), calib_ids, device="cpu", progress=False
    )
    bits = count_bits(model, get_adapter(model), report.weights)
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 160 * 64 + 64 * 160
    assert bits.quantized_weights == 2 * per_layer
    # a byte per 5 codes of a row (in base 3) + 32 bits of (α, μ) per (row, block) + 16 bits per permuted column
    codes = sum(w.shape[0] * 8 * -(-w.shape[1] // 5) for w in report.weights.values())
    side = sum(w.alpha.numel() * 32 + w.shape[1] * 16 * w.is_reordered() for w in report.weights.values())
    assert bits.storage_bits_per_weight == pytest.approx((codes + side) / bits.quantized_weights)
    assert bits.entropy_bits_per_weight == pytest.approx(
        (1.5849625 * bits.quantized_weights + side) / bits.quantized_weights, rel=1e-6
    )
    assert bits.embedding_params == 256 * 64  # tied embedding counted once


@pytest.mark.parametrize("spec,bits,groups", [("rtn2+gptq+g64", 2, 64), ("rtn3+gptq", 3, 128), ("e2m+gptq+g64", 2, 64)])
def test_group_size_and_uniform_bits_accounting(spec, bits, groups, calib_ids):
    """g64 halves the columns per grid; int-b weights store b-bit codes, a 16-bit scale and a
    b-bit zero point per (row, group); ternary codes a byte per 5 of a row and 16-bit α, μ per (row, group)."""
    model, report = quantize(tiny_llama(), QuantConfig.from_method(spec), calib_ids, device="cpu", progress=False)
    counted = count_bits(model, get_adapter(model), report.weights)
    side_per_group = 32 if spec.startswith("e2m") else 16 + bits
    n_groups = sum(w.shape[0] * -(-w.shape[1] // groups) for w in report.weights.values())
    assert all(w.block_size == groups for w in report.weights.values())
    code_bits = sum(
        w.shape[0] * (8 * -(-w.shape[1] // 5) if spec.startswith("e2m") else bits * w.shape[1])
        for w in report.weights.values()
    )
    assert counted.storage_bits_per_weight == pytest.approx(
        (code_bits + side_per_group * n_groups) / counted.quantized_weights
    )
    if not spec.startswith("e2m"):
        assert max(int(w.codes.max()) for w in report.weights.values()) <= 2**bits - 1


@pytest.mark.parametrize(
    "cls,cfg",
    [(MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config), (Qwen3ForCausalLM, Qwen3Config)],
)
def test_other_supported_architectures(cls, cfg, calib_ids):
    torch.manual_seed(0)
    extra = {"head_dim": 16} if cfg is Qwen3Config else {}
    model = cls(cfg(**SMALL_CONFIG, **extra)).eval()
    model, report = quantize(model, QuantConfig.from_method("e2m+gptq"), calib_ids, device="cpu", progress=False)
    assert len(report.weights) == 14


def test_unsupported_architecture_is_a_clear_error(calib_ids):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256))
    with pytest.raises(NotImplementedError, match="unsupported architecture 'gpt2'.*llama"):
        quantize(model, QuantConfig(), calib_ids, device="cpu", progress=False)


def test_nan_weights_are_rejected(tiny_model, calib_ids):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        quantize(tiny_model, QuantConfig(), calib_ids, device="cpu", progress=False)


def test_too_little_calibration_text():
    with pytest.raises(ValueError, match="too short"):
        calibration_windows(torch.arange(100), nsamples=4, seqlen=512, seed=0)
    with pytest.raises(ValueError, match="too short"):
        evaluation_windows(torch.arange(100), seqlen=512)


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(path))


def test_calibration_and_evaluation_must_be_disjoint(tmp_path):
    with pytest.raises(ValueError, match="share text.*emma"):
        check_disjoint(load_text("emma+mansfieldpark"), load_text("emma"))
    check_disjoint(load_text("emma"), load_text("prideprejudice"))


def test_unknown_text_source():
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus"):
        load_text("no_such_corpus")


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_model(str(tmp_path / "missing"))


def test_keeping_the_first_decoder_blocks():
    model = tiny_llama(num_hidden_layers=3)
    first = list(model.model.layers[:2])
    keep_layers(model, 2)
    assert list(model.model.layers) == first and model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
    with pytest.raises(ValueError, match="cannot keep 3 decoder blocks: the model has 2"):
        keep_layers(model, 3)
    with pytest.raises(ValueError, match="layers must be ≥ 1"):
        load_model("smollm2-135m", layers=0)  # refused before anything is loaded


def test_calibration_windows_follow_the_seed():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 4, 64, seed=3)
    assert torch.equal(a, calibration_windows(ids, 4, 64, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 4, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))


def test_perplexity_of_uniform_model_is_vocab_size(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()  # tied: also zeroes the embedding, logits all 0
    windows = torch.randint(0, 256, (3, 16))
    result = perplexity(tiny_model, windows, text="random", device="cpu")
    assert result.ppl == pytest.approx(256, rel=1e-4) and result.tokens == 3 * 15


def test_perplexity_is_the_mean_negative_log_likelihood_of_every_next_token(tiny_model):
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = tiny_model(windows).logits[:, :-1].double().log_softmax(-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    result = perplexity(tiny_model, windows, batch_size=2)
    assert result.nll == pytest.approx(float(nll), rel=1e-6) and result.ppl == pytest.approx(math.exp(result.nll))


def test_perplexity_bounds_the_logits_of_a_forward_pass(tiny_model, monkeypatch):
    """A large vocabulary gets fewer windows per forward pass; the result does not change."""
    import twla.evaluate.perplexity

    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    whole = perplexity(tiny_model, windows, batch_size=8)
    calls = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda ids, **kw: calls.append(len(ids)) or forward(ids, **kw))
    monkeypatch.setattr(twla.evaluate.perplexity, "LOGITS_LIMIT", 2 * 16 * 256)  # two windows' logits
    split = perplexity(tiny_model, windows, batch_size=8)
    assert calls == [2, 2, 1] and split.tokens == whole.tokens and split.nll == pytest.approx(whole.nll, rel=1e-6)


def test_scales_are_stored_in_16_bits(tiny_model, calib_ids):
    _, report = quantize(tiny_model, QuantConfig.from_method("e2m+gptq"), calib_ids, device="cpu", progress=False)
    for tw in report.weights.values():
        assert torch.equal(tw.alpha, tw.alpha.half().float()) and torch.equal(tw.mu, tw.mu.half().float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_quantization_matches_cpu(calib_ids):
    cfg = QuantConfig.from_method("e2m+gptq+ssr")
    cpu, rep_cpu = quantize(tiny_llama(), cfg, calib_ids, device="cpu", progress=False)
    gpu, rep_gpu = quantize(tiny_llama(), cfg, calib_ids, device="cuda", progress=False)
    assert {p.device.type for p in gpu.parameters()} == {"cpu"}
    for name in rep_cpu.weights:
        assert torch.equal(rep_cpu.weights[name].codes, rep_gpu.weights[name].codes), name


def test_windows_start_with_bos_where_the_tokenizer_puts_one():
    class Tokenizer:
        bos_token_id = 7

        def __init__(self, adds: bool) -> None:
            self.adds = adds

        def __call__(self, text):
            return {"input_ids": [7, 1] if self.adds else [1]}

    assert bos_token(Tokenizer(True)) == 7 and bos_token(Tokenizer(False)) is None
    ids = torch.arange(10, 1034)
    windows = evaluation_windows(ids, seqlen=64, max_tokens=630, bos=7)
    assert windows.shape == (10, 64) and (windows[:, 0] == 7).all()  # 630 // 63 windows
    assert torch.equal(windows[:, 1:].flatten(), ids[:630])  # every text token once, in order
    calib = calibration_windows(ids, 4, 64, seed=3, bos=7)
    assert calib.shape == (4, 64) and (calib[:, 0] == 7).all()
    assert torch.equal(evaluation_windows(ids, seqlen=64), ids[:1024].view(16, 64))  # no BOS: unchanged
