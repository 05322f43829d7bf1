"""Packed integer linears: the bit-plane layout, the CPU kernel on integer codes, and uniform and
mixed-precision models packed, saved and loaded exactly."""

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.deploy.cpu_layout import CpuLinear
from twla.deploy.format import packed_bits
from twla.deploy.integer_linear import IntegerLinear
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.deploy.ternary_linear import TernaryLinear
from twla.kernels.cpu import int4_available, integer_to_int4, matmul_int4
from twla.kernels.dispatch import kernel_backend
from twla.kernels.integer import dequantize_integer, pack_bits, pack_integer, unpack_bits
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant
from twla.models.adapters import get_adapter
from twla.quantization.accounting import count_bits

WMIX = {"weight_allocation": dict(samples=4, seqlen=32, stride=2, budget=3.0)}


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("columns", [8, 13, 64])
def test_bit_planes_hold_every_value_in_exactly_b_bits(bits, columns):
    g = torch.Generator().manual_seed(bits + columns)
    values = torch.randint(0, 2**bits, (5, columns), generator=g)
    planes = pack_bits(values, bits)
    assert planes.dtype == torch.uint8 and planes.shape == (bits, 5, -(-columns // 8))
    assert torch.equal(unpack_bits(planes, columns), values.to(torch.int32))


def test_values_and_widths_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match=r"outside \[0, 7\]"):
        pack_bits(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match=r"outside \[0, 15\]"):
        pack_bits(torch.tensor([[-1]]), 4)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        pack_bits(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="must be integers"):
        pack_integer(torch.zeros(2, 8), torch.ones(2, 1), torch.full((2, 1), 0.5), bits=3, group_size=8)
    w = pack_integer(torch.zeros(2, 8), torch.ones(2, 1), torch.zeros(2, 1), bits=8, group_size=8)
    with pytest.raises(ValueError, match="at most 4 bits"):
        integer_to_int4(w)


def random_integer(N: int, K: int, group: int, bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    G = -(-K // group)
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scale = (torch.rand(N, G, generator=g) * 0.1 + 0.01).to(torch.bfloat16).float()  # bfloat16-exact
    zero = torch.randint(0, 2**bits, (N, G), generator=g).float()
    return pack_integer(codes, scale, zero, bits=bits, group_size=group)


@pytest.mark.skipif(not int4_available(), reason="this torch has no CPU 4-bit weight kernel")
@pytest.mark.parametrize("N,K,group,bits", [(64, 256, 128, 4), (40, 100, 32, 3), (17, 200, 64, 2), (48, 576, 128, 3)])
@pytest.mark.parametrize("act", [UNQUANTIZED, ActivationQuant(4)])
def test_int4_kernel_multiplies_integer_codes(N, K, group, bits, act):
    """s (c − z) = (c − 8) s + s (8 − z): the kernel gives the reference product up to the bfloat16
    rounding of its offsets and output (a wrong code, group or zero point would be off by far more)."""
    w = random_integer(N, K, group, bits, seed=N + K)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    ref = act(x).double() @ dequantize_integer(w).double().T
    got = matmul_int4(x, integer_to_int4(w), act)
    assert (got.double() - ref).norm() / ref.norm() < 1e-2


def quantized(spec, calib_ids, overrides=None):
    config = QuantConfig.from_method(spec, overrides)
    config.check_packable(spec)
    return quantize(tiny_llama(0), config, calib_ids, device="cpu", progress=False)


@pytest.mark.parametrize(
    "spec,overrides,integers",
    [("rtn4+had+a4", None, 14), ("rtn3+gptq+ssr+g64", None, 14), ("pt2+gptq+had+a4+wmix", WMIX, None)],
)
def test_integer_and_mixed_models_pack_exactly_and_round_trip(spec, overrides, integers, calib_ids, tmp_path):
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    model, report = quantized(spec, calib_ids, overrides)
    with torch.no_grad():
        fake = model(tokens).logits
    bits = count_bits(model, get_adapter(model), report.weights)
    pack_model(model, report.weights)
    kinds = Counter(type(m).__name__ for m in model.modules() if isinstance(m, TernaryLinear | IntegerLinear))
    if integers is None:  # the mixed model: the formats its allocation chose
        formats = Counter(report.weight_allocation.formats.values())
        integers = sum(n for f, n in formats.items() if f != "ternary")
        assert 0 < integers < 14 and kinds["TernaryLinear"] == formats["ternary"]
    assert kinds["IntegerLinear"] == integers
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fake)  # the same x̂ and Ŵ
    path = str(tmp_path / "ckpt")
    files = save_packed(model, None, path, method=spec)
    # the file holds what the accounting counts: b-bit codes and zero points, fp16 scales, int16 column orders
    assert files == packed_bits(path) and files.bits_per_weight == pytest.approx(bits.storage_bits_per_weight)
    stored = load_file(f"{path}/model.safetensors")
    first = next(n for n, m in model.named_modules() if isinstance(m, IntegerLinear))
    assert stored[f"{first}.weight"].ndim == 3 and stored[f"{first}.scale"].dtype == torch.float16
    with kernel_backend("torch"):
        loaded, _, meta = load_packed(path)
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, fake)  # bit-identical after save → load
    assert meta["linears"][first]["kind"] == "integer"


@pytest.mark.cpu_layout
@pytest.mark.skipif(not int4_available(), reason="this torch has no CPU 4-bit weight kernel")
def test_cpu_loading_runs_4_bit_integers_in_the_kernel_and_8_bits_on_the_reference(calib_ids, tmp_path):
    for spec, served in (("rtn4+had+a4", True), ("rtn8", False)):
        model, report = quantized(spec, calib_ids)
        path = str(tmp_path / spec)
        save_packed(pack_model(model, report.weights), None, path)
        fast = load_packed(path)[0]
        with kernel_backend("torch"):
            ref = load_packed(path)[0]
        kinds = {type(m) for m in fast.modules()}
        assert (CpuLinear in kinds, IntegerLinear in kinds) == (served, not served)
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
        kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(fast.generate(ids, **kwargs), ref.generate(ids, **kwargs))
            a, b = fast(ids).logits, ref(ids).logits
        assert (a - b).norm() / b.norm() < 0.1


def test_zero_points_outside_the_grid_are_refused(calib_ids):
    model, report = quantized("rtn4", calib_ids)
    name, weight = next(iter(report.weights.items()))
    weight.zero[0, 0] = -1
    with pytest.raises(ValueError, match=r"zero points outside \[0, 15\]"):
        pack_model(model, {name: weight})
