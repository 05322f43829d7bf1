"""Packed checkpoints through transformers: from_pretrained, generate, pipeline, save_pretrained,
and the refusals (stock transformers without twla, quantizing inside from_pretrained)."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from tests.helpers import tiny_llama
from twla import QuantConfig, load_packed, pack_model, quantize, save_packed
from twla.deploy.hf_quantizer import TwlaConfig, TwlaHfQuantizer
from twla.deploy.ternary_linear import TernaryLinear
from twla.models.loading import save_checkpoint

METHOD = "pt2+gptq+ssr+had+a4"  # rotations shared by a site's linears, 4-bit activations, column orders


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    tokenizer = copy.deepcopy(small_tokenizer)  # the session's tokenizer keeps its settings
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def packed(tokenizer, tmp_path_factory):
    """(fake-quantized model, packed checkpoint directory) of a tiny Llama with the real tokenizer."""
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    calib = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    model, report = quantize(model, QuantConfig.from_method(METHOD), calib, device="cpu", progress=False)
    fake = copy.deepcopy(model)
    path = str(tmp_path_factory.mktemp("hf") / "ckpt")
    save_packed(pack_model(model, report.weights), tokenizer, path, method=METHOD)
    return fake, path


PROMPTS = ["It is a truth universally acknowledged", "Emma"]


@torch.no_grad()
def test_from_pretrained_builds_ternary_modules_and_generates_what_load_packed_does(packed, tokenizer):
    fake, path = packed
    model = AutoModelForCausalLM.from_pretrained(path)
    linears = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.uint8 for m in linears)
    assert model.model.layers[0].self_attn.k_proj.rot1 is model.model.layers[0].self_attn.q_proj.rot1
    reference, _, _ = load_packed(path)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, fake(ids).logits)  # the packed model computes the fake-quantized one
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy, reference.generate(ids, max_new_tokens=12, do_sample=False))
    assert torch.equal(greedy, fake.generate(ids, max_new_tokens=12, do_sample=False))
    sampled = []
    for m in (model, fake):
        torch.manual_seed(3)
        sampled.append(m.generate(ids, max_new_tokens=12, do_sample=True, top_k=50))
    assert torch.equal(*sampled)
    # a left-padded batch gives each prompt the continuation it gets alone
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    together = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=8, do_sample=False)
        assert torch.equal(together[row, -8:], alone[0, -8:])
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(PROMPTS[0], max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(greedy[0], skip_special_tokens=True)


@torch.no_grad()
def test_save_pretrained_writes_a_checkpoint_that_loads_back_bit_identically(packed, tmp_path):
    _, path = packed
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    model.save_pretrained(str(tmp_path / "again"))
    with (
        open(os.path.join(path, "model.safetensors"), "rb") as a,
        open(tmp_path / "again" / "model.safetensors", "rb") as b,
    ):
        assert a.read() == b.read()
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"))
    ids = torch.arange(20).unsqueeze(0)
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert isinstance(again.config.quantization_config, TwlaConfig)
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)  # codes stay uint8
    assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8 and half.dtype == torch.float16
    reference = model(ids).logits
    assert (half(ids).logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_stock_transformers_refuses_a_packed_checkpoint(packed, tmp_path):
    """Without ``import twla`` the packed codes meet dense linears of another shape: an error, not random weights."""
    _, path = packed
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({path!r})"
    # run outside the source tree, whose kernels/ would hide transformers' `kernels` dependency without twla
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert "got twla" in result.stderr and "MISMATCH" in result.stderr and "RuntimeError" in result.stderr


def test_quantizing_inside_from_pretrained_and_offloading_are_refused(tmp_path, tokenizer):
    dense = str(tmp_path / "dense")
    save_checkpoint(tiny_llama(), tokenizer, dense)
    with pytest.raises(ValueError, match="require the model to be pre-quantized"):
        AutoModelForCausalLM.from_pretrained(dense, quantization_config=TwlaConfig())
    quantizer = TwlaHfQuantizer(TwlaConfig(), pre_quantized=True)
    with pytest.raises(ValueError, match="one device"):
        quantizer.validate_environment(device_map={"model.embed_tokens": "cpu", "model.layers": "disk"})
    with pytest.raises(ValueError, match="unknown twla quantization_config fields: bits"):
        TwlaConfig(bits=2)
