"""Block-wise output reconstruction: the solver on a problem with a known optimum, the
straight-through quantizer, and the pipeline on a tiny Llama (codes frozen, the block's
held-out error lowered, stored grid = model weights, deterministic, bad input refused)."""

from dataclasses import replace

import pytest
import torch

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.bench.run import BenchConfig
from twla.deploy.save import pack_model
from twla.kernels.uniform import fake_quantize
from twla.quantization.reconstruct import matmul_dtype
from twla.quantization.sections import EndToEndConfig, ReconstructionConfig
from twla.quantization.tunables import Tunables, straight_through_codes
from twla.quantization.weights import TernaryWeight
from twla.solvers.reconstruct import Scaled, reconstruct


def _regression(windows: int = 12, seed: int = 0):
    """y_i = X_i θ* (+ noise); θ learned from θ₀ = θ* + offset."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(6, generator=g)
    X = [torch.randn(40, 6, generator=g) for _ in range(windows)]
    Y = [x @ theta + 0.01 * torch.randn(40, generator=g) for x in X]
    param = Scaled(theta + 0.5, torch.ones(6))

    def error(i):
        return ((X[i] @ param.value() - Y[i]) ** 2).sum()

    def reference(i):
        return (Y[i] ** 2).sum()

    return param, error, reference, theta


def test_solver_approaches_the_least_squares_optimum_and_keeps_its_best_iterate():
    param, error, reference, theta = _regression()
    result = reconstruct(
        [param], error, reference, train=list(range(10)), holdout=[10, 11], steps=300, lr=0.05, batch=2, eval_every=20
    )
    assert result.after < 0.01 * result.before
    assert result.after == min(result.holdout)  # the returned iterate is the best one judged
    assert torch.allclose(param.value(), theta, atol=0.05)


def test_solver_without_steps_changes_nothing():
    param, error, reference, _ = _regression()
    start = param.value().clone()
    result = reconstruct([param], error, reference, train=[0, 1], holdout=[2], steps=0, lr=0.1)
    assert torch.equal(param.value(), start) and result.before == result.after and result.steps == 0
    with pytest.raises(ValueError, match="training window"):
        reconstruct([param], error, reference, train=[], holdout=[2], steps=5, lr=0.1)


def test_solver_runs_the_model_only_on_the_windows_it_judges_or_trains_on():
    """The training windows' scale comes from ``reference``, not from a pass through F."""
    param, error, reference, _ = _regression()
    calls = []
    reconstruct(
        [param],
        lambda i: calls.append(i) or error(i),
        reference,
        train=list(range(10)),
        holdout=[10, 11],
        steps=0,
        lr=0.1,
    )
    assert calls == [10, 11]


def test_straight_through_quantizer_has_the_same_values_and_a_gradient():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    clip = torch.tensor(0.8, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    out = fake_quantize(xg, 4, clip=clip)
    assert torch.equal(out.detach(), fake_quantize(x, 4, clip=0.8))
    (out - 2 * x).pow(2).sum().backward()
    assert clip.grad is not None and clip.grad != 0
    assert xg.grad is not None and xg.grad.abs().sum() > 0  # round passes the gradient through


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _composite_fake_quantize(x, bits, clip, symmetric):
    """The quantizer written as autograd would record it, round differentiated as the identity."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        s = clip * x.abs().amax(-1, keepdim=True) / q
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s * torch.clamp(_RoundSTE.apply(x / s), -q, q)
    hi, lo = clip * x.amax(-1, keepdim=True), clip * x.amin(-1, keepdim=True)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = _RoundSTE.apply(-lo / s)
    return s * (torch.clamp(_RoundSTE.apply(x / s) + z, 0, 2**bits - 1) - z)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_straight_through_quantizer_gradient_is_that_of_the_composite(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64).float() * 3
    x[2] = 0.5  # a constant slice (span 0, scale 1): its gradient sums the same, wherever it goes
    weights = torch.randn(6, 40, generator=g)
    grads = []
    for quantizer in (_composite_fake_quantize, lambda *a: fake_quantize(a[0], a[1], clip=a[2], symmetric=a[3])):
        xg, clip = x.clone().requires_grad_(True), torch.tensor(0.8, requires_grad=True)
        out = quantizer(xg, bits, clip, symmetric)
        (out * weights).sum().backward()
        grads.append((out.detach(), xg.grad, clip.grad))
    (ref, ref_x, ref_clip), (out, grad_x, grad_clip) = grads
    assert torch.equal(out, ref)
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(grad_x[rows], ref_x[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x[2].sum(), ref_x[2].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_clip, ref_clip, rtol=1e-5, atol=1e-4)


def test_tuned_weights_are_built_in_the_type_of_the_products():
    g = torch.Generator().manual_seed(0)
    weight = TernaryWeight(
        codes=torch.randint(-1, 2, (8, 64), generator=g, dtype=torch.int8),
        perm=torch.arange(64),
        block_size=32,
        alpha=torch.rand(8, 2, generator=g) + 0.5,
        mu=0.1 * torch.randn(8, 2, generator=g),
        has_offset=True,
    )
    tunables = Tunables({"lin": {k: Scaled(v, v.abs()) for k, v in weight.grid().items()}}, {}, {}, {}, {"lin": weight})
    root = torch.nn.Module()
    root.lin = torch.nn.Linear(64, 8, bias=False)
    assert tunables.overrides(root)["lin.weight"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        built = tunables.overrides(root)["lin.weight"]
    assert built.dtype == torch.bfloat16  # no float32 copy for autocast to cast again
    torch.testing.assert_close(built.float(), weight.dequantize(), rtol=2**-7, atol=2**-7)  # to bfloat16's precision


def _recon_config(spec: str, **overrides) -> QuantConfig:
    config = QuantConfig.from_method(spec)
    recon = replace(config.reconstruction, **{"steps": 30, "holdout": 2, "eval_every": 5, **overrides})
    return replace(config, reconstruction=recon)


@pytest.mark.parametrize("spec", ["e2m+gptq+ssr+had+a4+recon", "rtn4+gptq+recon", "pt2+gptq+sal+recon"])
def test_reconstruction_keeps_codes_and_lowers_the_held_out_block_error(spec):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    base = spec.removesuffix("+recon")
    plain_model, plain = quantize(tiny_llama(), QuantConfig.from_method(base), calib, device="cpu", progress=False)
    model, report = quantize(tiny_llama(), _recon_config(spec), calib, device="cpu", progress=False)
    assert [r["layer"] for r in report.reconstruction] == [0, 1]
    for block in report.reconstruction:
        assert block["after"] <= block["before"] and block["holdout"][0] == block["before"]
    if spec.startswith("e2m"):  # W4 leaves the tiny model's blocks little to recover
        assert any(block["after"] < 0.99 * block["before"] for block in report.reconstruction)
        tuned = model.model.layers[0].input_layernorm.weight
        assert not torch.equal(tuned, plain_model.model.layers[0].input_layernorm.weight)
    # layer 0 sees the same inputs in both runs: its codes are the frozen ones of the plain solve
    for name, weight in report.weights.items():
        if ".0." in name:
            assert torch.equal(weight.codes, plain.weights[name].codes), name
        for value in weight.grid().values():
            assert torch.equal(value, value.half().float())  # stored in 16 bits
        assert torch.equal(model.get_submodule(name).weight.detach(), weight.dequantize())


def test_straight_through_codes_round_to_ternary_levels_with_an_identity_gradient():
    z = torch.tensor([-1.7, -0.6, -0.4, 0.3, 0.51, 1.4], requires_grad=True)
    codes = straight_through_codes(z)
    assert codes.tolist() == [-1, -1, 0, 0, 1, 1]
    codes.sum().backward()
    assert torch.equal(z.grad, torch.ones(6))


def test_learned_rounding_moves_codes_one_level_and_packs_exactly():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    _, frozen = quantize(tiny_llama(), QuantConfig.from_method("pt2+gptq+had+a4"), calib, device="cpu", progress=False)
    config = _recon_config("pt2+gptq+had+a4+round", code_lr=0.1, holdout=0, batch=2)
    model, report = quantize(tiny_llama(), config, calib, device="cpu", progress=False)
    first = report.reconstruction[0]  # judged on the training windows (no held-out ones)
    assert first["after"] < first["before"]
    moved = 0
    for name, weight in report.weights.items():
        assert set(weight.codes.unique().tolist()) <= {-1, 0, 1} and weight.codes.dtype == torch.int8
        assert torch.equal(model.get_submodule(name).weight.detach(), weight.dequantize())
        if ".0." in name:  # layer 0 sees the same inputs and starts from the same codes
            step = (weight.codes.int() - frozen.weights[name].codes.int()).abs()
            assert int(step.max()) <= 1  # an offset in [−1, 1] moves a code at most one level
            moved += int(step.sum())
    assert moved > 0
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(pack_model(model, report.weights)(ids).logits, model(ids).logits)


def test_learned_rounding_is_refused_for_weights_without_plain_ternary_codes():
    for spec in ("rtn4+gptq+round", "pt2+gptq+struct+round"):
        with pytest.raises(ValueError, match="learns plain ternary codes"):
            QuantConfig.from_method(spec)
    with pytest.raises(ValueError, match="code_lr"):
        ReconstructionConfig(codes=True, code_lr=0)
    with pytest.raises(ValueError, match="choose one"):
        QuantConfig.from_method("pt2+gptq+recon+round")


def test_reconstruction_tunes_clipping_and_packs_to_the_same_outputs():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model, report = quantize(tiny_llama(), _recon_config("e2m+gptq+had+a4+recon"), calib, device="cpu", progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.act.clip, float) and q.act.clip == q.act_clips[4]
    record = next(r for r in report.records if r.name == "model.layers.0.self_attn.q_proj")
    assert record.act_clip == q.act.clip
    ids = calib[:2]
    with torch.no_grad():
        expected = model(ids).logits
        packed = pack_model(model, report.weights)
        assert torch.equal(packed(ids).logits, expected)


def test_reconstruction_is_deterministic_per_seed():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    config = _recon_config("e2m+gptq+recon", batch=2)
    runs = [
        quantize(tiny_llama(), c, calib, device="cpu", progress=False)[1] for c in (config, config, config.with_seed(1))
    ]
    a, b, c = ({n: w.alpha for n, w in r.weights.items()} for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_reconstruction_refuses_too_few_windows_before_any_work():
    with pytest.raises(ValueError, match="holds out 4 of the 4 calibration windows"):
        quantize(tiny_llama(), QuantConfig.from_method("e2m+recon"), torch.zeros(4, 16, dtype=torch.long), device="cpu")
    with pytest.raises(ValueError, match="holds out 4 of the 3"):
        BenchConfig(methods=("e2m+gptq+recon",), nsamples=3)
    with pytest.raises(ValueError, match="nothing to tune"):
        ReconstructionConfig(grid=False, norms=False, clips=False)


def _mean_kl(model, reference, ids, stride: int) -> float:
    """Mean KL(p_reference ‖ p_model) over every stride-th position of the windows ``ids``."""
    with torch.no_grad():
        keep = torch.arange(0, ids.shape[1], stride)
        log_p = torch.log_softmax(reference(ids).logits[:, keep].float(), -1)
        log_q = torch.log_softmax(model(ids).logits[:, keep].float(), -1)
        return float((log_p.exp() * (log_p - log_q)).sum() / (ids.shape[0] * len(keep)))


@pytest.mark.parametrize("holdout", [0, 2])
def test_end_to_end_lowers_the_kl_it_reports_and_packs_to_the_same_outputs(holdout):
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    base = QuantConfig.from_method("pt2+gptq+had+a4")
    e2e = EndToEndConfig(steps=40, lr=2e-2, holdout=holdout, eval_every=5, stride=2, top_k=0, precision="float32")
    plain, _ = quantize(tiny_llama(), base, calib, device="cpu", progress=False)
    model, report = quantize(tiny_llama(), replace(base, end_to_end=e2e), calib, device="cpu", progress=False)
    judged = calib[-holdout:] if holdout else calib  # without held-out windows the training windows judge
    before, after = (_mean_kl(m, tiny_llama(), judged, 2) for m in (plain, model))
    # the solver's errors are the KL measured independently (teacher stored in float16)
    result = report.end_to_end
    assert result["before"] == pytest.approx(before, rel=2e-2)
    assert result["after"] == pytest.approx(after, rel=2e-2)
    assert result["after"] == min(result["holdout"])  # the kept iterate is the best judged one
    if not holdout:  # the tiny random model's held-out windows share little with its 6 training windows
        assert after < 0.7 * before
    record = next(r for r in report.records if r.name == "model.layers.1.mlp.down_proj")
    assert record.act_clip == model.model.layers[1].mlp.down_proj.act.clip
    for name, weight in report.weights.items():
        assert torch.equal(model.get_submodule(name).weight.detach(), weight.dequantize())
    with torch.no_grad():
        assert torch.equal(pack_model(model, report.weights)(calib[:2]).logits, model(calib[:2]).logits)


def test_end_to_end_refuses_too_few_windows_and_a_bad_stride():
    with pytest.raises(ValueError, match="holds out 4 of the 3 calibration windows"):
        quantize(tiny_llama(), QuantConfig.from_method("pt2+e2e"), torch.zeros(3, 16, dtype=torch.long), device="cpu")
    with pytest.raises(ValueError, match="stride must be ≥ 1"):
        EndToEndConfig(stride=0)


def test_the_layer_wise_pass_runs_on_the_first_layer_windows_and_end_to_end_on_all():
    """``layer_windows``: GPTQ, clipping and block-wise reconstruction see the first windows only
    (the same model as with those windows alone); the teacher and the end-to-end stage see all
    (its held-out windows lie past the layer-wise ones)."""
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(3))
    recon = ReconstructionConfig(steps=4, holdout=1, eval_every=2)
    base = replace(QuantConfig.from_method("pt2+gptq+had+a4"), reconstruction=recon)
    alone, _ = quantize(tiny_llama(), base, calib[:4], device="cpu", progress=False)
    split, _ = quantize(tiny_llama(), replace(base, layer_windows=4), calib, device="cpu", progress=False)
    whole, _ = quantize(tiny_llama(), base, calib, device="cpu", progress=False)

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    assert same(alone, split) and not same(alone, whole)
    e2e = EndToEndConfig(steps=0, holdout=2, stride=2, top_k=0)
    _, report = quantize(
        tiny_llama(), replace(base, layer_windows=4, end_to_end=e2e), calib, device="cpu", progress=False
    )
    assert report.end_to_end["before"] == pytest.approx(_mean_kl(split, tiny_llama(), calib[-2:], 2), rel=2e-2)
    config = replace(base, layer_windows=4, end_to_end=e2e)
    assert QuantConfig.from_dict(config.to_dict()) == config
    old = config.to_dict()
    old.pop("layer_windows")
    assert QuantConfig.from_dict({**old, "version": 6}).layer_windows is None
    v7 = replace(config, end_to_end=EndToEndConfig()).to_dict()  # version 7: the teacher kept all tokens
    v7["end_to_end"].pop("top_k")
    assert QuantConfig.from_dict({**v7, "version": 7}).end_to_end == EndToEndConfig(top_k=0) != EndToEndConfig()


def test_layer_windows_beyond_the_calibration_mean_all_of_it_and_too_few_are_refused_before_any_work():
    calib = torch.zeros(8, 16, dtype=torch.long)
    assert QuantConfig.from_method("pt2+e2e", layer_windows=9).layer_windows_of(8) == 8
    assert QuantConfig.from_method("pt2+e2e").layer_windows_of(8) == 8
    with pytest.raises(ValueError, match="holds out 4 of the 4 calibration windows"):
        quantize(tiny_llama(), QuantConfig.from_method("pt2+recon+e2e", layer_windows=4), calib, device="cpu")
    with pytest.raises(ValueError, match="layer_windows must be ≥ 1"):
        QuantConfig.from_method("pt2+e2e", layer_windows=0)
    with pytest.raises(ValueError, match="holds out 4 of the 3"):
        BenchConfig(methods=("pt2+recon",), nsamples=64, layer_windows=3)


def test_end_to_end_in_bfloat16_multiplies_in_bfloat16_and_still_lowers_the_kl():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    base = QuantConfig.from_method("pt2+gptq+had+a4")
    reports = {}
    for precision in ("float32", "bfloat16"):
        e2e = EndToEndConfig(steps=20, lr=2e-2, holdout=0, eval_every=5, stride=2, top_k=0, precision=precision)
        config = replace(base, end_to_end=e2e)
        _, reports[precision] = quantize(tiny_llama(), config, calib, device="cpu", progress=False)
        result = reports[precision].end_to_end
        assert result["precision"] == precision and result["after"] < 0.8 * result["before"]
    # the same model before the first step, its KL measured through products rounded to bfloat16
    before = {p: r.end_to_end["before"] for p, r in reports.items()}
    assert before["bfloat16"] != before["float32"] and before["bfloat16"] == pytest.approx(before["float32"], rel=0.05)


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert matmul_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert (matmul_dtype("float32", cpu), matmul_dtype("bfloat16", cpu)) == (torch.float32, torch.bfloat16)


def test_an_unknown_precision_is_refused_and_version_8_configurations_multiplied_in_float32():
    with pytest.raises(ValueError, match="unknown reconstruction precision 'float8'"):
        EndToEndConfig(precision="float8")
    config = QuantConfig.from_method("pt2+recon+e2e")
    assert (config.reconstruction.precision, config.end_to_end.precision) == ("float32", "auto")
    v8 = config.to_dict()
    for section in ("reconstruction", "end_to_end"):
        v8[section].pop("precision")
    upgraded = QuantConfig.from_dict({**v8, "version": 8})
    assert upgraded.end_to_end == replace(config.end_to_end, precision="float32")
    assert upgraded.reconstruction == config.reconstruction
