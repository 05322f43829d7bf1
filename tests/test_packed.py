"""Packed ternary modules and checkpoints: equal to the fake-quantized model, round trips, errors."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.cli import main
from twla.deploy.format import CheckpointError, packed_bits, read_config, read_meta
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.deploy.ternary_linear import TernaryLinear
from twla.kernels.dispatch import kernel_backend, resolve, set_kernel_backend
from twla.kernels.packing import pack_codes
from twla.kernels.trits import unpack_trits
from twla.models.adapters import get_adapter
from twla.quantization.accounting import count_bits

SPECS = ("e2m+gptq+ssr", "e2m+gptq+ssr+had+a4", "e2m+gptq+ssr+g64+had+a4", "pt2+gptq+r1+had+a8+sym", "absmean+kotms+a6")


def quantized(spec, calib_ids, seed=0):
    return quantize(tiny_llama(seed), QuantConfig.from_method(spec), calib_ids, device="cpu", progress=False)


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def logits(model, tokens):
    return model(tokens).logits


@pytest.mark.parametrize("spec", SPECS)
def test_packed_model_equals_fake_quantized_and_round_trips(spec, calib_ids, tokens, tmp_path):
    model, report = quantized(spec, calib_ids)
    fake = logits(model, tokens)
    bits = count_bits(model, get_adapter(model), report.weights)
    pack_model(model, report.weights)
    linears = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.uint8 for m in linears)
    packed = logits(model, tokens)
    assert torch.equal(packed, fake)  # the torch path computes the same x̂ and Ŵ
    files = save_packed(model, None, str(tmp_path / "ckpt"), method=spec, config={"note": "test"})
    loaded, tokenizer, meta = load_packed(str(tmp_path / "ckpt"))
    assert tokenizer is None and meta["method"] == spec and meta["config"] == {"note": "test"}
    assert torch.equal(logits(loaded, tokens), packed)  # bit-identical after save → load
    assert files == packed_bits(str(tmp_path / "ckpt"))
    # the file holds exactly what the accounting counts: 2-bit codes, fp16 α/μ, int16 column orders
    assert files.bits_per_weight == pytest.approx(bits.storage_bits_per_weight, rel=1e-12)
    assert files.quantized_weights == bits.quantized_weights
    assert files.file_bytes < files.fp16_bytes
    for name, module in loaded.named_modules():
        if isinstance(module, TernaryLinear):
            assert meta["linears"][name]["act_bits"] == module.act.bits
            assert (module.rot1 is not None) == ("had" in spec or "kotms" in spec)


def test_mixed_activation_bits_and_shared_rotations(calib_ids, tokens, tmp_path):
    model, report = quantized("e2m+gptq+had+a4", calib_ids)
    q = model.model.layers[0].self_attn.q_proj
    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.act_clips = {6: 0.9}
        layer.mlp.down_proj.set_act_bits(6 + 2 * index)
    fake = logits(model, tokens)
    assert q.rot1 is model.model.layers[0].self_attn.k_proj.rot1  # one factor per site
    save_packed(pack_model(model, report.weights), None, str(tmp_path / "m"))
    loaded, _, meta = load_packed(str(tmp_path / "m"))
    assert torch.equal(logits(loaded, tokens), fake)
    downs = [meta["linears"][f"model.layers.{i}.mlp.down_proj"] for i in range(2)]
    assert [(d["act_bits"], d["act_clip"]) for d in downs] == [(6, 0.9), (8, 1.0)]
    sources = loaded.config.quantization_config.rotation_sources
    assert sources["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.rot1" in stored and "model.layers.0.self_attn.k_proj.rot1" not in stored
    with torch.no_grad():
        loaded.model.layers[0].self_attn.q_proj.rot1.mul_(2)  # shared after loading too
    assert loaded.model.layers[0].self_attn.k_proj.rot1[0, 0] == loaded.model.layers[0].self_attn.q_proj.rot1[0, 0]


def test_biased_architecture_round_trips(calib_ids, tokens, tmp_path):
    """Qwen2 has biases on q/k/v: they travel with the packed linears."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.helpers import SMALL_CONFIG

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL_CONFIG)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    model, report = quantize(model, QuantConfig.from_method("e2m+gptq+had+a4"), calib_ids, device="cpu", progress=False)
    fake = logits(model, tokens)
    save_packed(pack_model(model, report.weights), None, str(tmp_path / "qwen"))
    loaded, _, meta = load_packed(str(tmp_path / "qwen"))
    assert meta["linears"]["model.layers.0.self_attn.q_proj"]["bias"] and meta["model_type"] == "qwen2"
    assert torch.equal(logits(loaded, tokens), fake)
    with kernel_backend("triton"):
        assert torch.allclose(logits(loaded, tokens), fake, atol=1e-4 * fake.abs().max())


@pytest.mark.parametrize("spec", ["pt2+gptq+ssr+had+a4+recon", "pt2+gptq+r1+had+a4"])
def test_fused_projection_architecture_round_trips(spec, calib_ids, tokens, tmp_path):
    """Phi-3 computes q/k/v in one linear and gate/up in another: each is one linear of its site."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from tests.helpers import SMALL_CONFIG

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**SMALL_CONFIG, pad_token_id=0)).eval()
    dense = logits(model, tokens)
    model, report = quantize(model, QuantConfig.from_method(spec), calib_ids, device="cpu", progress=False)
    fake = logits(model, tokens)
    assert len(report.weights) == 8 and "model.layers.1.self_attn.qkv_proj" in report.weights
    assert (fake - dense).abs().mean() < 0.5 * dense.abs().mean()  # quantized, not broken
    save_packed(pack_model(model, report.weights), None, str(tmp_path / "phi3"))
    loaded, _, meta = load_packed(str(tmp_path / "phi3"))
    assert meta["model_type"] == "phi3" and torch.equal(logits(loaded, tokens), fake)


def test_loading_a_state_dict_refreshes_the_derived_buffers(calib_ids, tokens):
    """A TernaryLinear filled by load_state_dict recomputes its inverse order and weight sums."""
    model, report = quantized("e2m+gptq+ssr+had+a4", calib_ids)
    pack_model(model, report.weights)
    up = next(m for m in model.modules() if isinstance(m, TernaryLinear) and m.perm is not None)  # order matters
    fresh = TernaryLinear.from_settings(up.settings())
    fresh.load_state_dict(up.state_dict())
    assert torch.equal(fresh.inverse_perm, up.inverse_perm) and torch.equal(fresh.wsum, up.wsum)
    assert torch.equal(fresh.dequantize(), up.dequantize())


@pytest.mark.parametrize("spec", ["e2m+gptq+ssr", "e2m+gptq+ssr+had+a4", "e2m+gptq+g64+had+a4", "e2m+gptq+had+a8+sym"])
def test_triton_backend_matches_torch_on_packed_model(spec, calib_ids, tokens):
    model, report = quantized(spec, calib_ids)
    pack_model(model, report.weights)
    for x in (tokens, tokens[:1, :3]):  # GEMM (48 tokens) and decode GEMV (3 tokens)
        with kernel_backend("torch"):
            ref = logits(model, x)
        with kernel_backend("triton"):
            got = logits(model, x)
        assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


def test_unquantized_tensors_can_be_stored_in_16_bits(calib_ids, tokens, tmp_path):
    model, report = quantized("e2m+gptq+ssr+had+a4", calib_ids)
    pack_model(model, report.weights)
    full = save_packed(model, None, str(tmp_path / "fp32"))
    half = save_packed(model, None, str(tmp_path / "fp16"), dtype=torch.float16)
    assert half.linear_bytes == full.linear_bytes and 2 * half.embedding_bytes == full.embedding_bytes
    assert half.rotation_bytes == full.rotation_bytes  # norms and rotation factors are kept as they are
    loaded, _, _ = load_packed(str(tmp_path / "fp16"))
    assert loaded.model.embed_tokens.weight.dtype == torch.float32  # loaded in the requested dtype
    ref = logits(model, tokens)
    # rounding the embedding flips a few 4-bit activation codes, which spread: a few percent here
    assert (logits(loaded, tokens) - ref).norm() / ref.norm() < 0.1


def test_packing_is_deterministic(calib_ids, tmp_path):
    for name in ("a", "b"):
        model, report = quantized("e2m+gptq+ssr+had+a4", calib_ids)
        save_packed(pack_model(model, report.weights), None, str(tmp_path / name))
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b")) and {"model.safetensors", "twla_quant.json"} <= set(files)
    for name in files:  # byte-identical files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_kernel_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    with kernel_backend("torch"):
        assert resolve(cpu) == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        set_kernel_backend("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernel_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve(cpu)
    assert resolve(cpu) == "torch"  # auto


@pytest.fixture
def saved(calib_ids, tmp_path):
    model, report = quantized("e2m+gptq+ssr+had+a4", calib_ids)
    path = str(tmp_path / "ckpt")
    save_packed(pack_model(model, report.weights), None, path, method="e2m+gptq+ssr+had+a4")
    return path


def resign(path, edit_meta=lambda meta: None, edit_linears=None):
    """Record the files' current digests (after an edit), so only the consistency checks can catch it;
    ``edit_linears`` changes the packed linears' settings in config.json and twla_quant.json alike."""
    from twla.deploy.format import meta_digest, sha256_file

    meta = json.load(open(os.path.join(path, "twla_quant.json")))
    edit_meta(meta)
    if edit_linears is not None:
        config_file = os.path.join(path, "config.json")
        config = json.load(open(config_file))
        for linears in (config["quantization_config"]["linears"], meta["linears"]):
            edit_linears(linears)
        json.dump(config, open(config_file, "w"))
    meta["files"] = {name: sha256_file(os.path.join(path, name)) for name in meta["files"]}
    meta["digest"] = meta_digest(meta)
    with open(os.path.join(path, "twla_quant.json"), "w") as fh:
        json.dump(meta, fh)


def _rewrite_tensors(path, change):
    """Change the tensor file and re-sign it."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)
    resign(path)


def test_corrupt_and_mismatched_checkpoints_are_refused(saved, tmp_path):
    file = os.path.join(saved, "model.safetensors")
    data = bytearray(open(file, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(file, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match the SHA-256"):
        load_packed(saved)
    open(file, "wb").write(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_packed(saved)
    with pytest.raises(CheckpointError, match="not a packed twla checkpoint"):
        load_packed(str(tmp_path))
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_packed(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.alpha"), "missing"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected"),
        (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 9, dtype=torch.uint8)}), "shape"),
    ],
)
def test_checkpoint_tensors_must_match_the_model(saved, change, message):
    _rewrite_tensors(saved, change)
    with pytest.raises(CheckpointError, match=message):
        load_packed(saved)


def _as_older_version(path, version):
    """Rewrite the packed checkpoint at ``path`` as format ``version`` wrote it: ternary codes in
    2 bits, at stride 4 (k = 4r + j in bits 2j..2j+1 of row r) in version 3, in grouped bit
    planes in versions 4 and 5."""
    meta = json.load(open(os.path.join(path, "twla_quant.json")))

    def planes(tensors):
        for name, linear in meta["linears"].items():
            codes = unpack_trits(tensors[f"{name}.weight"], linear["in_features"])
            if version > 3:
                tensors[f"{name}.weight"] = pack_codes(codes, linear["group_size"])
                continue
            c = torch.nn.functional.pad((codes + 1).to(torch.uint8), (0, -linear["in_features"] % 4), value=1)
            c = c.view(c.shape[0], -1, 4)
            tensors[f"{name}.weight"] = (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).T.contiguous()

    _rewrite_tensors(path, planes)
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"]["version"] = version
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    resign(path, lambda m: m.update(version=version))


@pytest.mark.parametrize("version", [3, 4, 5])
def test_older_formats_are_refused_with_advice_and_convert_exactly(saved, tmp_path, capsys, version):
    """Formats 3 to 5 stored ternary codes in 2 bits; `twla upgrade` rewrites them in base 3,
    giving this version's tensor file byte for byte."""
    old = str(tmp_path / f"v{version}")
    shutil.copytree(saved, old)
    _as_older_version(old, version)
    with pytest.raises(CheckpointError, match=f"version {version} is not supported .*twla upgrade {old}"):
        load_packed(old)
    new = str(tmp_path / "v6")
    assert main(["upgrade", old, "--out", new]) == 0
    assert f"format version {version} converted" in capsys.readouterr().out
    assert (
        open(os.path.join(new, "model.safetensors"), "rb").read()
        == open(os.path.join(saved, "model.safetensors"), "rb").read()
    )
    ids = torch.randint(0, 100, (1, 16))
    assert torch.equal(load_packed(new)[0](ids).logits, load_packed(saved)[0](ids).logits)
    assert main(["upgrade", new, "--out", str(tmp_path / "again")]) == 2
    assert "already format version 6" in capsys.readouterr().err


def test_checkpoint_config_must_match(saved):
    config_file = os.path.join(saved, "config.json")
    config = json.load(open(config_file))
    json.dump({**config, "intermediate_size": 128}, open(config_file, "w"))
    resign(saved)
    with pytest.raises(CheckpointError, match="mlp.down_proj is 64×160 but the model's config gives 64×128"):
        load_packed(saved)
    json.dump(config, open(config_file, "w"))
    up = "model.layers.0.mlp.up_proj"
    resign(saved, edit_linears=lambda linears: linears[up].update(act_bits=5))
    with pytest.raises(CheckpointError, match=f"invalid settings for {up}: .*activation bit-width 5"):
        load_packed(saved)
    resign(saved, edit_linears=lambda linears: linears[up].pop("act_symmetric"))
    with pytest.raises(CheckpointError, match=f"invalid settings for {up}: KeyError"):
        load_packed(saved)
    resign(saved, lambda meta: meta["linears"][up].update(act_bits=8))
    with pytest.raises(CheckpointError, match="packed linears of config.json and twla_quant.json disagree"):
        load_packed(saved)
    meta_file = os.path.join(saved, "twla_quant.json")
    resign(saved, lambda meta: meta.update(model_type="qwen2"))
    with pytest.raises(CheckpointError, match="'llama' model but the packed weights are for 'qwen2'"):
        load_packed(saved)
    meta = json.load(open(meta_file))
    json.dump({**meta, "version": 99}, open(meta_file, "w"))
    with pytest.raises(CheckpointError, match="version 99"):
        load_packed(saved)
    open(meta_file, "w").write("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_packed(saved)


@pytest.mark.parametrize("spec", ["pt2+gptq+ssr+had+a4+recon+e2e", "e2m+act+reloc+r1+amp-site", "rtn3+gptq+g64+sym+a4"])
def test_config_dicts_round_trip_and_older_versions_upgrade(spec):
    """to_dict → JSON → from_dict is the identity; a version-4 dict (frozen codes, no learned
    rounding fields) and a version-3 dict (plain ternary weights, no structured fields either)
    rebuild the same configuration; a version-1 dict (flat rotation fields, before the
    KOTMS and relocation problems were nested) rebuilds the same configuration; a version-2 dict
    (before learned rotations were gated) rebuilds one that keeps every learned rotation."""
    config = QuantConfig.from_method(spec).with_seed(5)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    v3 = json.loads(json.dumps(config.to_dict()))
    for section in ("reconstruction", "end_to_end"):  # version 4 kept the codes
        for key in ("codes", "code_lr"):
            (v3[section] or {}).pop(key, None)
    assert QuantConfig.from_dict({**v3, "version": 4}) == config
    for key in ("salient", "groups"):  # version 3 had plain ternary weights only
        v3["weights"].pop(key, None)
    assert QuantConfig.from_dict({**v3, "version": 3}) == config
    rotation = dict(v3["rotation"])
    kotms, relocation = rotation.pop("kotms"), rotation.pop("relocation")
    flat = {**rotation, **kotms, "relocate": relocation is not None}
    flat.update({f"relocate_{k}": v for k, v in (relocation or {}).items()})
    assert QuantConfig.from_dict({**v3, "version": 1, "rotation": flat}) == config
    kotms.pop("gate")
    v2 = {**v3, "version": 2, "rotation": {**v3["rotation"], "kotms": kotms}}
    ungated = replace(config.rotation.kotms, gate=False)
    assert QuantConfig.from_dict(v2) == replace(config, rotation=replace(config.rotation, kotms=ungated))


def test_method_overrides_replace_fields_of_the_sections_the_method_uses():
    config = QuantConfig.from_method(
        "pt2+gptq+recon+e2e+amp",
        {"weights": {"damp": 0.05}, "allocation": {"budget": 6}, "end_to_end": {"steps": 7, "lr": 1e-2}},
    )
    assert config.weights.damp == 0.05 and config.allocation.budget == 6 and config.activations.bits == 6
    assert (config.end_to_end.steps, config.end_to_end.lr, config.end_to_end.top_k) == (7, 1e-2, 64)
    assert config.reconstruction == QuantConfig.from_method("pt2+recon").reconstruction  # untouched
    with pytest.raises(ValueError, match="overrides of end_to_end, which this method does not use"):
        QuantConfig.from_method("pt2+recon", {"end_to_end": {"steps": 7}})
    with pytest.raises(ValueError, match="'rotation': not a configuration section"):
        QuantConfig.from_method("pt2+had", {"rotation": {"seed": 1}})
    with pytest.raises(ValueError, match="steps ≥ 0"):
        QuantConfig.from_method("pt2+recon", {"reconstruction": {"steps": -1}})


def test_config_round_trips_through_the_checkpoint(calib_ids, tmp_path):
    """The recorded configuration rebuilds the identical QuantConfig, and quantizing again with
    it gives the identical weights; an edited or foreign configuration is refused."""
    spec = "e2m+gptq+ssr+had+a4+recon"
    config = QuantConfig.from_method(spec).with_seed(3)
    model, report = quantize(tiny_llama(), config, calib_ids, device="cpu", progress=False)
    path = str(tmp_path / "ckpt")
    save_packed(pack_model(model, report.weights), None, path, method=spec, config=config.to_dict())
    rebuilt = read_config(path)
    assert rebuilt == config
    _, again = quantize(tiny_llama(), rebuilt, calib_ids, device="cpu", progress=False)
    for name, w in report.weights.items():
        assert torch.equal(w.codes, again.weights[name].codes) and torch.equal(w.alpha, again.weights[name].alpha)
    resign(path, lambda meta: meta["config"].update(version=0))
    with pytest.raises(CheckpointError, match="format version 0"):
        read_config(path)
    resign(path, lambda meta: meta["config"].update(version=2, rotation={**meta["config"]["rotation"], "spin": 1}))
    with pytest.raises(CheckpointError, match="rotation: unknown fields spin"):
        read_config(path)


def test_save_is_atomic_and_checks_its_input(calib_ids, saved, monkeypatch):
    before = read_meta(saved)["digest"]
    model, report = quantized("e2m+gptq+ssr", calib_ids, seed=1)
    with pytest.raises(ValueError, match="pack_model"):
        save_packed(model, None, saved, overwrite=True)
    pack_model(model, report.weights)
    with pytest.raises(ValueError, match="was it packed already"):
        pack_model(model, report.weights)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("twla.deploy.save.write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_packed(model, None, saved, overwrite=True)
    assert read_meta(saved)["digest"] == before  # the old checkpoint is untouched
    assert not [f for f in os.listdir(os.path.dirname(saved)) if f.startswith(".twla-")]


def test_deployment_imports_without_solver_packages(saved):
    """Kernels, packed modules, checkpoints and the benchmark need only torch, triton,
    transformers, numpy and safetensors."""
    code = f"""
import sys
for name in ("scipy", "geoopt", "ortools", "cvxpy", "highspy", "matplotlib", "gguf", "accelerate"):
    sys.modules[name] = None
import torch
from twla.deploy.load import load_packed
from twla.bench.speed import run_speed
model, _, _ = load_packed({saved!r})
print(model(torch.tensor([[1, 2, 3]])).logits.shape)
run_speed(quick=True, models=(), out="")
solver_side = ("twla.solvers.bits", "twla.quantization.pipeline", "twla.quantization.config")
blocked = [m for m in solver_side if m in sys.modules]
assert not blocked, blocked
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 3, 256])" in result.stdout and "GPU rows" in result.stdout


def test_storage_shared_outside_the_models_tied_weights_is_refused(calib_ids, tmp_path):
    """Every tensor is stored once; sharing that loading would not restore (not a tied weight) is an error."""
    model, report = quantized("pt2+gptq+ssr", calib_ids)
    pack_model(model, report.weights)
    model.model.norm.weight = model.model.layers[0].input_layernorm.weight
    with pytest.raises(ValueError, match="model.norm.weight shares its storage with .*input_layernorm.weight"):
        save_packed(model, None, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
