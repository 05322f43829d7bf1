import math
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.helpers import SMALL_CONFIG, correlated_inputs, tiny_llama
from twla import QuantConfig, quantize
from twla.models.adapters import get_adapter
from twla.quantization.fake_quant import wrap_linears
from twla.quantization.rotation import apply_residual_rotation, install_rotation, site_weight
from twla.quantization.sections import ActivationConfig, KotmsConfig, RelocationConfig, RotationConfig
from twla.quantization.site_rotations import site_rotations
from twla.solvers.kotms import (
    activation_noise,
    learn_kotms,
    site_errors,
    trimodal_loss,
    trimodal_terms,
    trimodality,
)
from twla.solvers.kronecker import (
    FactorWarning,
    hadamard,
    kron_apply,
    kron_apply_t,
    kron_factors,
    random_hadamard,
    random_orthogonal,
    rotate_metric,
)
from twla.solvers.relocation import relocate, relocation_loss
from twla.solvers.stiefel import STIEFEL_SOLVERS
from twla.solvers.ternary import block_atq

G = torch.Generator


def _orthogonality_error(R: torch.Tensor) -> float:
    eye = torch.eye(R.shape[-1], dtype=R.dtype)
    return float((R.mT @ R - eye).abs().max())


@pytest.mark.parametrize("m1,m2", [(4, 6), (1, 7), (24, 24)])
def test_reshape_identity_matches_dense_kronecker(m1, m2):
    g = G().manual_seed(0)
    R1, R2 = random_orthogonal(m1, g), random_orthogonal(m2, g)
    R = torch.kron(R1, R2)
    x = torch.randn(3, 5, m1 * m2, dtype=torch.float64, generator=g)
    assert torch.allclose(kron_apply(x, R1, R2), x @ R, atol=1e-12)
    assert torch.allclose(kron_apply_t(x, R1, R2), x @ R.T, atol=1e-12)
    assert torch.allclose(kron_apply_t(kron_apply(x, R1, R2), R1, R2), x, atol=1e-12)
    S = x.reshape(-1, m1 * m2).T @ x.reshape(-1, m1 * m2)
    assert torch.allclose(rotate_metric(S, R1, R2), R.T @ S @ R, atol=1e-10)


def test_batched_factors_rotate_each_matrix():
    g = G().manual_seed(1)
    R1 = torch.stack([random_orthogonal(3, g) for _ in range(2)])
    R2 = torch.stack([random_orthogonal(4, g) for _ in range(2)])
    W = torch.randn(2, 5, 12, dtype=torch.float64, generator=g)
    out = kron_apply(W, R1[:, None], R2[:, None])
    for i in range(2):
        assert torch.allclose(out[i], W[i] @ torch.kron(R1[i], R2[i]), atol=1e-12)


def test_factor_sizes():
    assert [kron_factors(m) for m in (576, 1536, 4096, 11008)] == [(24, 24), (32, 48), (64, 64), (86, 128)]
    assert kron_factors(160, (8, 20)) == (8, 20)
    with pytest.warns(FactorWarning, match="577 is prime.*dense"):
        assert kron_factors(577) == (1, 577)
    with pytest.warns(FactorWarning, match="unevenly as 2×577"):
        assert kron_factors(1154) == (2, 577)
    with pytest.raises(ValueError, match="25×24 do not multiply to the dimension 576"):
        kron_factors(576, (25, 24))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 32, 36, 48, 64, 128])
def test_hadamard_matrices(n):
    H = hadamard(n)
    assert H is not None and set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_no_hadamard_falls_back_with_a_message():
    assert hadamard(86) is None and hadamard(6) is None
    model = tiny_llama()  # the MLP width 160 = 10×16: no Hadamard matrix of order 10
    with pytest.warns(FactorWarning, match="order 10.*random orthogonal"):
        rotations, _ = site_rotations(model, get_adapter(model), RotationConfig(site="hadamard"), progress=False)
    for R1, R2 in rotations.values():
        assert _orthogonality_error(R1) < 1e-12 and _orthogonality_error(R2) < 1e-12


def _random_inputs(model, tokens: int = 32) -> dict:
    """Random input rows for every (layer, site) of a model, as the pipeline's samples."""
    adapter = get_adapter(model)
    g = G().manual_seed(7)
    return {
        (i, s.name): torch.randn(tokens, site_weight(layer, adapter, s).shape[1], generator=g)
        for i, layer in enumerate(adapter.decoder_layers(model))
        for s in adapter.sites
    }


def _rotate_everything(model, site: str, residual: str):
    adapter = get_adapter(model)
    if residual != "none":
        apply_residual_rotation(model, adapter, residual)
    wrap_linears(model, adapter)
    cfg = RotationConfig(site=site, init="random", kotms=KotmsConfig(steps=5))
    rotations, _ = site_rotations(model, adapter, cfg, progress=False, inputs=_random_inputs(model))
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for s in adapter.sites:
            install_rotation(layer, adapter, s, *rotations[(i, s.name)])
    return model


@pytest.mark.parametrize("site,residual", [("kotms", "hadamard"), ("random", "random"), ("hadamard", "none")])
def test_rotated_full_precision_model_reproduces_logits(site, residual, calib_ids):
    reference = tiny_llama()(calib_ids).logits
    model = _rotate_everything(tiny_llama(), site, residual)
    if residual != "none":
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: γ folded into the head
        assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert model.model.layers[0].mlp.down_proj.rotated
    assert torch.allclose(model(calib_ids).logits, reference, atol=2e-5, rtol=1e-4)


def test_rotated_model_with_biases_reproduces_logits(calib_ids):
    def make():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(**SMALL_CONFIG)).eval()

    reference = make()(calib_ids).logits
    model = _rotate_everything(make(), "random", "hadamard")
    assert torch.allclose(model(calib_ids).logits, reference, atol=2e-5, rtol=1e-4)


def _mixture_reference(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tri-modal NLL and responsibilities written directly as a three-Gaussian mixture."""
    Z = Z - Z.mean(-1, keepdim=True)
    c = Z.abs().mean(-1, keepdim=True)
    s = 0.25 * c
    dens = torch.stack(
        [torch.exp(-0.5 * ((Z - k * c) / s) ** 2) / (s * math.sqrt(2 * math.pi)) / 3 for k in (-1, 0, 1)], -1
    )
    p = dens.sum(-1)
    return -torch.log(p).mean((-2, -1)), (dens / p[..., None]).mean((-3, -2))


def test_trimodal_loss_is_the_mixture_likelihood():
    Z = torch.randn(2, 6, 40, dtype=torch.float64, generator=G().manual_seed(2))
    nll, resp = trimodal_terms(Z)
    ref_nll, ref_resp = _mixture_reference(Z)
    assert torch.allclose(nll, ref_nll, atol=1e-10) and torch.allclose(resp, ref_resp, atol=1e-10)
    ternary = torch.randint(-1, 2, (1, 8, 300), generator=G().manual_seed(3)).double()
    assert trimodal_loss(ternary + 0.01 * torch.randn_like(ternary)) < trimodal_loss(torch.randn_like(ternary))


@pytest.mark.parametrize("solver", [s for s in STIEFEL_SOLVERS if s != "fixed"])
def test_kotms_lowers_the_loss_and_stays_orthogonal(solver):
    g = G().manual_seed(4)
    # a ternary matrix seen through a random rotation: shaping can undo the rotation
    T = torch.randint(-1, 2, (2, 64, 48), generator=g).double()
    R = torch.kron(random_orthogonal(6, g), random_orthogonal(8, g))
    W = T @ R.T + 0.01 * torch.randn(T.shape, generator=g, dtype=torch.float64)
    eye1, eye2 = torch.eye(6).expand(2, 6, 6), torch.eye(8).expand(2, 8, 8)
    lr = 0.2 if solver == "riemannian-sgd" else 5e-2
    res = learn_kotms(W, eye1, eye2, solver=solver, steps=40, lr=lr)
    assert res.losses[-1] < 0.8 * res.losses[0]
    assert max(_orthogonality_error(r) for r in (*res.R1, *res.R2)) < 1e-12
    fit_before, _ = trimodality(W)
    fit_after, _ = trimodality(kron_apply(W, res.R1[:, None], res.R2[:, None]))
    assert (fit_after < fit_before).all()


def test_fixed_solver_returns_the_start():
    W = torch.randn(1, 8, 16, dtype=torch.float64)
    R1, R2 = torch.eye(4).expand(1, 4, 4), torch.eye(4).expand(1, 4, 4)
    res = learn_kotms(W, R1, R2, solver="fixed", steps=10)
    assert torch.equal(res.R1, R1.double()) and len(res.losses) == 2


def test_relocation_lowers_the_ternarized_output_error():
    g = G().manual_seed(5)
    X = correlated_inputs(512, 48, seed=5)
    S = X.T @ X / X.shape[0]
    weights = [torch.randn(40, 48, generator=g, dtype=torch.float64) for _ in range(2)]
    R1, R2 = torch.eye(6, dtype=torch.float64), torch.eye(8, dtype=torch.float64)
    res = relocate(weights, S, R1, R2, steps=30, lr=2e-2, block_size=16)
    assert res.losses[-1] < res.losses[0]
    assert max(_orthogonality_error(r) for r in (res.R1, res.R2)) < 1e-12
    again = float(
        relocation_loss([w.float() for w in weights], S.float(), res.R1.float(), res.R2.float(), block_size=16)
    )
    assert again == pytest.approx(res.losses[-1], rel=1e-4)


def test_relocation_is_measured_per_layer(tiny_model, calib_ids):
    cfg = QuantConfig.from_method("e2m+gptq+kotms+reloc")
    _, report = quantize(tiny_model, cfg, calib_ids, device="cpu", progress=False)
    for rec in report.records:
        assert rec.relocation["after"] <= rec.relocation["before"]
        assert rec.rotation in ("8⊗8", "10⊗16")
    assert set(report.rotation.sites) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}


def test_rotation_config_errors():
    with pytest.raises(ValueError, match="unknown rotation site 'givens'"):
        RotationConfig(site="givens")
    with pytest.raises(ValueError, match="unknown KOTMS solver"):
        RotationConfig(kotms=KotmsConfig(solver="newton"))
    with pytest.raises(ValueError, match="relocation steps must be ≥ 0"):
        RelocationConfig(steps=-1)
    with pytest.raises(ValueError, match="several choices of site rotation"):
        QuantConfig.from_method("e2m+had+kotms")
    bad = replace(QuantConfig.from_method("e2m+gptq"), rotation=RotationConfig(site="hadamard", factors={64: (7, 9)}))
    with pytest.raises(ValueError, match="7×9 do not multiply to the dimension 64"):
        quantize(tiny_llama(), bad, torch.zeros(1, 8, dtype=torch.long), device="cpu", progress=False)


def test_activation_term_spreads_outliers():
    g = G().manual_seed(6)
    X = torch.randn(1, 256, 64, generator=g, dtype=torch.float64)
    X[..., 3] *= 50.0  # one outlier channel
    H = random_hadamard(8, g)
    eye = torch.eye(8, dtype=torch.float64)
    assert activation_noise(kron_apply(X, H, H)) < 0.2 * activation_noise(X)
    W = torch.randn(1, 32, 64, generator=g, dtype=torch.float64)
    start = (eye.expand(1, 8, 8), eye.expand(1, 8, 8))
    with_term = learn_kotms(W, *start, steps=40, lr=5e-2, X=X, activation_weight=10.0)
    plain = learn_kotms(W, *start, steps=40, lr=5e-2)
    rotated = kron_apply(X, with_term.R1[:, None], with_term.R2[:, None])
    assert activation_noise(rotated) < 0.5 * activation_noise(X)
    assert activation_noise(rotated) < activation_noise(kron_apply(X, plain.R1[:, None], plain.R2[:, None]))


def test_activation_term_in_the_pipeline(calib_ids):
    cfg = QuantConfig.from_method("e2m+gptq+act+a4")
    assert cfg.rotation.site == "kotms" and cfg.rotation.kotms.activation_weight > 0
    _, report = quantize(tiny_llama(), cfg, calib_ids, device="cpu", progress=False)
    assert all(len(s.losses) > 2 for s in report.rotation.sites.values())
    with pytest.raises(ValueError, match="several choices of site rotation"):
        QuantConfig.from_method("e2m+had+act")


def _min_max(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row asymmetric min-max quantization written out: integer zero point, codes 0 … 2^b − 1."""
    lo, hi = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def test_site_errors_against_dense_rotation_and_written_out_quantizer():
    g = G().manual_seed(8)
    W = torch.randn(24, 48, generator=g, dtype=torch.float64)
    X = torch.randn(64, 48, generator=g, dtype=torch.float64)
    X[:, 5] *= 20.0
    R1, R2 = random_orthogonal(6, g).double(), random_orthogonal(8, g).double()
    R = torch.kron(R1, R2)
    Y, T = X @ W.T, block_atq(W @ R, block_size=128, iters=6)[0]
    XQ = _min_max(X @ R, 4)

    def rel(out):
        return float(((out - Y) ** 2).sum() / (Y**2).sum())

    errors = site_errors(W, X, R1, R2, bits=4)
    expected = {"weight": rel(X @ R @ T.T), "activation": rel(XQ @ (W @ R).T), "combined": rel(XQ @ T.T)}
    for kind, value in expected.items():
        assert errors[kind] == pytest.approx(value, rel=1e-4), kind
    unquantized = site_errors(W, X, R1, R2, bits=16)
    assert unquantized["activation"] < 1e-25 and unquantized["combined"] == pytest.approx(unquantized["weight"])


@pytest.mark.parametrize("gate", [True, False])
def test_learned_rotation_kept_only_where_it_lowers_the_combined_error(gate):
    model = tiny_llama()
    adapter = get_adapter(model)
    wrap_linears(model, adapter)
    inputs = _random_inputs(model, tokens=64)
    for x in inputs.values():  # an outlier channel, the case rotations exist for
        x[:, 1] *= 30.0
    cfg = RotationConfig(site="kotms", kotms=KotmsConfig(steps=30, gate=gate))
    acts = ActivationConfig(bits=4)
    rotations, report = site_rotations(model, adapter, cfg, progress=False, inputs=inputs, activations=acts)
    start, _ = site_rotations(model, adapter, replace(cfg, site="hadamard"), progress=False)
    kept = 0
    for site in adapter.sites:
        sh = report.sites[site.name]
        fixed, learned = sh.errors["fixed"]["combined"], sh.errors["learned"]["combined"]
        for i, (f, l, took) in enumerate(zip(fixed, learned, sh.learned, strict=True)):
            assert took == (l < f or not gate)
            R1, R2 = rotations[(i, site.name)]
            W = site_weight(adapter.decoder_layers(model)[i], adapter, site)
            # the installed rotation is the one the flag names, and its error is the one recorded
            again = site_errors(W, inputs[(i, site.name)][1::2], R1, R2, bits=4)["combined"]
            assert again == pytest.approx(l if took else f, rel=1e-9)
            if not took:
                assert all(torch.equal(a, b) for a, b in zip((R1, R2), start[(i, site.name)], strict=True))
            kept += took
    print(f"gate={gate}: learned rotation kept in {kept} of {len(adapter.sites) * len(fixed)} (layer, site)")
