from dataclasses import replace

import pytest
import torch

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.kernels.uniform import fake_quantize
from twla.quantization.clipping import calibrate_clip
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.sections import ActivationConfig


def _heavy_tailed(n: int, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g) ** 3


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_per_token_levels(bits):
    x = _heavy_tailed(16, 64)
    asym = fake_quantize(x, bits)
    sym = fake_quantize(x, bits, symmetric=True)
    q = 2 ** (bits - 1) - 1
    for row_x, row_a, row_s in zip(x, asym, sym, strict=True):
        assert row_a.unique().numel() <= 2**bits
        assert row_s.unique().numel() <= 2 * q + 1
        step = row_x.abs().max() / q
        assert torch.allclose(row_s / step, torch.round(row_s / step), atol=1e-4)
        assert (row_a - row_x).abs().max() <= (row_x.max() - row_x.min()) / (2**bits - 1) / 2 + 1e-5
    assert torch.equal(fake_quantize(x, 16), x)


def test_clipping_shrinks_the_range():
    x = _heavy_tailed(4, 256)
    sym = fake_quantize(x, 4, clip=0.5, symmetric=True)
    assert (sym.abs().amax(dim=1) <= 0.5 * x.abs().amax(dim=1) + 1e-5).all()
    asym = fake_quantize(x, 4, clip=0.5)
    step = 0.5 * (x.amax(dim=1) - x.amin(dim=1)) / 15  # the zero point may shift the grid by half a step
    assert (asym.amax(dim=1) <= 0.5 * x.amax(dim=1) + step).all()


def test_bad_activation_settings():
    with pytest.raises(ValueError, match="unsupported bit-width 5"):
        fake_quantize(torch.ones(2, 3), 5)
    with pytest.raises(ValueError, match="clipping ratio"):
        fake_quantize(torch.ones(2, 3), 4, clip=1.5)
    with pytest.raises(ValueError, match="activation bits for bits: 5"):
        ActivationConfig(bits=5)
    with pytest.raises(ValueError, match="activation bits for model.layers.0.mlp.up_proj: 7"):
        ActivationConfig(bits=4, layer_bits={"model.layers.0.mlp.up_proj": 7})
    with pytest.raises(ValueError, match="clip_grid"):
        ActivationConfig(bits=4, clip_grid=(1.2,))
    with pytest.raises(ValueError, match="non-empty"):
        calibrate_clip(torch.zeros(0, 8), torch.ones(2, 8), torch.ones(2, 8), bits=4, symmetric=False, grid=(1.0,))


def test_clip_calibration_picks_the_grid_minimum():
    X = _heavy_tailed(512, 64, seed=1)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    grid = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    choice = calibrate_clip(X, W, W, bits=3, symmetric=False, grid=grid)
    # oracle: the error at each ratio in float64, from the quantizer's definition
    direct = {}
    for p in grid:
        x = X.double()
        s = p * (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / (2**3 - 1)
        z = torch.round(-p * x.amin(dim=1, keepdim=True) / s)
        q = s * (torch.clamp(torch.round(x / s) + z, 0, 2**3 - 1) - z)
        direct[p] = float(torch.linalg.norm((q - x) @ W.double().T) ** 2 / torch.linalg.norm(x @ W.double().T) ** 2)
    assert set(choice.errors) == set(grid)
    assert choice.clip == min(direct, key=direct.get) < 1.0  # outliers: clipping pays at 3 bits
    assert all(choice.errors[p] == pytest.approx(direct[p], rel=1e-3) for p in grid)


def test_w158a4_pipeline_quantizes_every_linear_input(calib_ids):
    model, report = quantize(
        tiny_llama(), QuantConfig.from_method("e2m+gptq+had+a4"), calib_ids, device="cpu", progress=False
    )
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(modules) == 14 and all(m.act.bits == 4 and m.rotated for m in modules)
    grid = ActivationConfig().clip_grid
    assert all(r.act_clip in grid and r.act_error["calibrated"] <= r.act_error["clip=1"] for r in report.records)
    seen = []
    hook = modules[0].register_forward_hook(lambda mod, args, out: seen.append(mod.quantize_input(args[0])))
    model(calib_ids[:1])
    hook.remove()
    assert max(tok.unique().numel() for tok in seen[0].reshape(-1, 64)) <= 16
    a16, _ = quantize(tiny_llama(), QuantConfig.from_method("e2m+gptq+had"), calib_ids, device="cpu", progress=False)
    assert not torch.allclose(a16(calib_ids).logits, model(calib_ids).logits)


def test_per_layer_bits_override(calib_ids):
    name = "model.layers.1.mlp.down_proj"
    cfg = replace(QuantConfig.from_method("e2m+gptq"), activations=ActivationConfig(bits=8, layer_bits={name: 2}))
    model, report = quantize(tiny_llama(), cfg, calib_ids, device="cpu", progress=False)
    bits = {r.name: r.act_bits for r in report.records}
    assert bits[name] == 2 and all(b == 8 for n, b in bits.items() if n != name)
    assert model.get_submodule(name).act.bits == 2


def test_rtn_reference_is_uniform_4_bit(calib_ids):
    model, report = quantize(
        tiny_llama(), QuantConfig.from_method("rtn4+had+a4"), calib_ids, device="cpu", progress=False
    )
    w = report.weights["model.layers.0.self_attn.q_proj"]
    assert w.bits == 4 and int(w.codes.max()) <= 15
    W = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert torch.allclose(W, w.dequantize(), atol=1e-6)
    assert max(row.unique().numel() for row in W) <= 16  # one 64-column group per row


def test_unclipped_reference_is_always_measured(calib_ids):
    X = _heavy_tailed(64, 16, seed=3)
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    choice = calibrate_clip(X, W, W, bits=4, symmetric=False, grid=(0.9, 0.8))
    assert set(choice.errors) == {1.0, 0.9, 0.8}
    cfg = replace(QuantConfig.from_method("e2m+a4"), activations=ActivationConfig(bits=4, clip_grid=(0.9, 0.8)))
    _, report = quantize(tiny_llama(), cfg, calib_ids, device="cpu", progress=False)
    assert all(r.act_clip in (1.0, 0.9, 0.8) and "clip=1" in r.act_error for r in report.records)
