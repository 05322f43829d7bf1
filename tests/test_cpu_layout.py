"""The CPU path: torch's grouped 4-bit kernel on ternary codes, and packed models loaded into it."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.deploy.cpu_layout import Bf16Embedding, CpuLinear, converted
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.deploy.ternary_linear import TernaryLinear
from twla.kernels.cpu import int4_available, int4_group, matmul_int4, to_int4
from twla.kernels.dispatch import kernel_backend
from twla.kernels.packing import PackedTernary, dequantize, pack_ternary
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant

pytestmark = pytest.mark.skipif(not int4_available(), reason="this torch has no CPU 4-bit weight kernel")


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """Values that bfloat16 holds exactly (so only the kernel's sums round)."""
    return t.to(torch.bfloat16).float()


def random_weight(N: int, K: int, group: int, seed: int) -> PackedTernary:
    g = torch.Generator().manual_seed(seed)
    T = (torch.randint(0, 3, (N, K), generator=g) - 1).to(torch.int8)
    G = -(-K // group)
    alpha = bf16_exact(torch.rand(N, G, generator=g) + 0.1)
    mu = bf16_exact(torch.randn(N, G, generator=g) * 0.1)
    return pack_ternary(T, alpha, mu, group_size=group)


@pytest.mark.parametrize(
    "N,K,group", [(64, 256, 128), (40, 100, 32), (48, 576, 128), (17, 200, 64), (576, 1536, 128), (16, 96, 96)]
)
@pytest.mark.parametrize(
    "act", [UNQUANTIZED, ActivationQuant(4), ActivationQuant(4, 0.8, symmetric=True), ActivationQuant(8)]
)
@pytest.mark.parametrize("M", [1, 7])
def test_int4_kernel_matches_the_reference(N, K, group, act, M):
    """Codes, α, μ, short last groups, padded rows and columns, quantized activations: with values
    bfloat16 holds exactly, the kernel gives the reference product up to its bfloat16 output
    (2⁻⁹ relative; a wrong code, group or offset would be off by far more)."""
    w = random_weight(N, K, group, seed=N + K)
    x = bf16_exact(torch.randn(M, K, generator=torch.Generator().manual_seed(M)))
    ref = act(x).double() @ dequantize(w).double().T
    got = matmul_int4(x, to_int4(w), act)
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=4e-3, atol=4e-3 * ref.abs().max())


def test_int4_kernel_rounds_alpha_mu_to_bfloat16_only():
    """With general fp16 α, μ the error is that of bfloat16 (8 significant bits), no more."""
    g = torch.Generator().manual_seed(0)
    T = (torch.randint(0, 3, (128, 512), generator=g) - 1).to(torch.int8)
    alpha, mu = (
        (torch.rand(128, 4, generator=g) + 0.1).half().float(),
        (torch.randn(128, 4, generator=g) * 0.1).half().float(),
    )
    w = pack_ternary(T, alpha, mu, group_size=128)
    x = torch.randn(3, 512, generator=g)
    act = ActivationQuant(4)
    ref = act(x) @ dequantize(w).T
    err = (matmul_int4(x, to_int4(w), act) - ref).norm() / ref.norm()
    assert 1e-5 < err < 1e-2


def test_groups_the_kernel_cannot_take_are_refused():
    assert int4_group(128) == 64 and int4_group(96) == 32 and int4_group(100) is None
    with pytest.raises(ValueError, match="multiple of 32"):
        to_int4(random_weight(16, 100, 100, seed=0))


def test_cpu_linear_matches_the_reference_linear_with_rotation_order_and_bias():
    w = random_weight(48, 64, 32, seed=3)
    ref = TernaryLinear(64, 48, 32, bias=True, rotation=(8, 8), reordered=True, act=ActivationQuant(4))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        ref.weight.copy_(w.stored())
        ref.alpha.copy_(w.alpha)
        ref.mu.copy_(w.mu)
        ref.perm.copy_(torch.randperm(64, generator=g))
        ref.rot1.copy_(torch.linalg.qr(torch.randn(8, 8, generator=g))[0])
        ref.rot2.copy_(torch.linalg.qr(torch.randn(8, 8, generator=g))[0])
        ref.bias.copy_(torch.randn(48, generator=g))
    ref.refresh()
    fast = CpuLinear(ref)
    x = torch.randn(2, 5, 64, generator=g)
    with kernel_backend("torch"), torch.no_grad():
        want = ref(x)
    got = fast(x)
    assert got.shape == want.shape and fast.rot1 is ref.rot1
    # the rotated activations round to bfloat16 differently only where a 4-bit code sits on a tie
    assert ((got - want).norm() / want.norm()) < 1e-2
    with pytest.raises(RuntimeError, match="converted to the CPU kernel's layout"):
        fast(torch.empty(1, 64, device="meta"))


def test_a_sites_linears_share_rotation_and_codes_and_compute_what_each_computes_alone():
    from twla.deploy.cpu_layout import SiteInput

    g = torch.Generator().manual_seed(6)
    R1, R2 = (torch.linalg.qr(torch.randn(8, 8, generator=g))[0] for _ in range(2))
    acts = [ActivationQuant(4, 0.9), ActivationQuant(4, 0.7), ActivationQuant(8, 0.8), ActivationQuant(16)]
    refs = []
    for k, act in enumerate(acts):
        w = random_weight(32 + 16 * k, 64, 64, seed=k)
        ref = TernaryLinear(64, w.out_features, 64, rotation=(8, 8), reordered=k == 1, act=act)
        with torch.no_grad():
            ref.weight.copy_(w.stored())
            ref.alpha.copy_(w.alpha)
            ref.mu.copy_(w.mu)
            ref.rot1.copy_(R1)
            ref.rot2.copy_(R2)
            if k == 1:
                ref.perm.copy_(torch.randperm(64, generator=g))
        ref.refresh()
        refs.append(ref)
    site = SiteInput(refs[0].rot1, refs[0].rot2)
    shared = [CpuLinear(ref, site) for ref in refs]
    assert [m.slot for m in shared] == [0, 1, None, None]  # 8 bits quantize alone, 16 bits not at all
    for x in (torch.randn(1, 1, 64, generator=g), torch.randn(3, 5, 64, generator=g)):
        outs = [m(x) for m in shared]
        assert site.x is None and site.rotated is None and site.codes is None  # let go once all are served
        alone = [CpuLinear(ref)(x) for ref in refs]
        assert all(torch.equal(a, b) for a, b in zip(outs, alone, strict=True))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model, report = quantize(
        tiny_llama(0), QuantConfig.from_method("pt2+gptq+had+a4"), calib, device="cpu", progress=False
    )
    path = str(tmp_path_factory.mktemp("cpu") / "packed")
    save_packed(pack_model(model, report.weights), None, path, dtype=torch.bfloat16)
    return path


@pytest.mark.cpu_layout
def test_loading_on_the_cpu_converts_and_generates_the_reference_tokens(checkpoint):
    fast, _, _ = load_packed(checkpoint)
    with kernel_backend("torch"):
        ref, _, _ = load_packed(checkpoint)
    assert converted(fast) and not converted(ref)
    assert not any(isinstance(m, TernaryLinear) for m in fast.modules())
    assert isinstance(fast.get_input_embeddings(), Bf16Embedding)
    assert fast.get_output_embeddings().weight is fast.get_input_embeddings().weight  # still tied, stored once
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, **kwargs), ref.generate(ids, **kwargs))
        a, b = fast(ids).logits, ref(ids).logits
    # 4-bit codes that sit on a rounding tie flip and spread: a few percent on a random tiny model
    assert a.dtype == torch.float32 and (a - b).norm() / b.norm() < 0.1
    weights = sum(t.nbytes for t in {id(t): t for t in [*fast.parameters(), *fast.buffers()]}.values())
    reference = sum(t.nbytes for t in {id(t): t for t in [*ref.parameters(), *ref.buffers()]}.values())
    assert weights < reference


@pytest.mark.cpu_layout
def test_from_pretrained_converts_and_a_converted_model_is_not_saved(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert any(isinstance(m, CpuLinear) for m in model.modules())
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(str(tmp_path / "again"))
    assert not (tmp_path / "again").exists() or not any((tmp_path / "again").iterdir())


@pytest.mark.parametrize(
    "act",
    [ActivationQuant(4), ActivationQuant(4, 0.85), ActivationQuant(4, 0.9, symmetric=True), ActivationQuant(8, 0.7)],
)
def test_token_codes_are_the_fake_quantizers_values(act):
    from twla.kernels.cpu import token_codes
    from twla.kernels.uniform import fake_quantize

    g = torch.Generator().manual_seed(act.bits)
    x = torch.randn(32, 576, generator=g) * torch.rand(32, 1, generator=g) * 10
    x[3], x[4] = 0.5, 0.0  # constant rows: the scale falls back to 1
    q, scale = token_codes(x, act.bits, act.clip, act.symmetric)
    assert torch.equal(q, q.round()) and q.abs().max() <= 2**act.bits
    assert torch.equal(scale * q, fake_quantize(x, act.bits, clip=act.clip, symmetric=act.symmetric))
    clips = (act.clip, 0.75, 1.0)  # several linears reading x, each with its own ratio, at once
    q, scale = token_codes(x, act.bits, torch.tensor(clips).view(-1, 1, 1), act.symmetric)
    for k, clip in enumerate(clips):
        assert torch.equal(scale[k] * q[k], fake_quantize(x, act.bits, clip=clip, symmetric=act.symmetric))
