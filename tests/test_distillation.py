"""The end-to-end stage's objective: the KL to the teacher over the whole vocabulary, and over its
top k tokens and the rest (a lower bound that is exact at k = V and zero at the teacher), and
the pipeline with a top-k teacher on every position."""

from dataclasses import replace

import pytest
import torch

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize
from twla.quantization.distillation import TeacherWindow, kl_positions, teacher_log_probs
from twla.quantization.sections import EndToEndConfig


def _logits(seed: int, positions: int = 6, vocab: int = 50) -> torch.Tensor:
    return 3 * torch.randn(positions, vocab, generator=torch.Generator().manual_seed(seed))


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Σ_t KL(p_t ‖ q_t) in float64."""
    log_p, log_q = (torch.log_softmax(x.double(), -1) for x in (teacher, student))
    return float((log_p.exp() * (log_p - log_q)).sum())


def test_the_full_teacher_gives_the_kl_and_top_k_a_lower_bound_that_grows_with_k():
    teacher, student = _logits(0), _logits(1)
    exact = _kl(teacher, student)
    assert float(TeacherWindow.of(teacher, 0).kl(student)) == pytest.approx(exact, rel=1e-3)
    assert float(TeacherWindow.of(teacher, 50).kl(student)) == pytest.approx(exact, rel=1e-3)  # k = V: all
    bounds = [float(TeacherWindow.of(teacher, k).kl(student)) for k in (1, 4, 16, 49)]
    assert all(0 < a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] < exact and bounds[-1] == pytest.approx(exact, rel=2e-2)
    window = TeacherWindow.of(teacher, 4)
    assert window.log_probs.dtype == torch.float16 and window.tokens.shape == (6, 4)
    assert torch.equal(window.tokens.long(), teacher.topk(4, -1).indices)


def test_top_k_is_zero_at_the_teacher_and_coarsens_the_tail_into_one_outcome():
    teacher = _logits(2)
    assert float(TeacherWindow.of(teacher, 3).kl(teacher)) == pytest.approx(0, abs=1e-3)
    # a student that moves mass only among the teacher's tail tokens is not seen by KL_k
    tail = teacher.topk(47, -1, largest=False).indices
    student = teacher.scatter(-1, tail, teacher.gather(-1, tail).flip(-1))
    assert float(TeacherWindow.of(teacher, 3).kl(student)) == pytest.approx(0, abs=1e-3)
    assert _kl(teacher, student) > 0.1


def _coarse_kl_float64(window: TeacherWindow, student: torch.Tensor) -> torch.Tensor:
    """KL_k by its definition, in float64, differentiated by autograd."""
    log_p, log_q = window.log_probs.double(), torch.log_softmax(student.double(), -1)
    tokens, p = window.tokens.long(), window.log_probs.double().exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    log_q_rest = log_q.scatter(-1, tokens, float("-inf")).logsumexp(-1)
    return (p * (log_p - log_q.gather(-1, tokens))).sum() + (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_kl_and_its_gradient_are_those_of_the_definition(dtype):
    window = TeacherWindow.of(_logits(3, vocab=500), 16)
    student = _logits(4, vocab=500).to(dtype)
    values, grads = [], []
    for kl in (_coarse_kl_float64, TeacherWindow.kl):
        x = student.clone().requires_grad_(True)
        value = kl(window, x)
        value.backward()
        assert x.grad.dtype == dtype
        values.append(float(value.detach()))
        grads.append(x.grad.double())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)


def test_the_teacher_multiplies_in_the_type_it_is_given():
    """A bfloat16 teacher is the model run under bfloat16 autocast: close to the float32 one, not equal."""
    model, calib, cpu = tiny_llama(), torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)), "cpu"
    full = teacher_log_probs(model, calib, 1, device=torch.device(cpu))
    half = teacher_log_probs(model, calib, 1, device=torch.device(cpu), dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast(cpu, dtype=torch.bfloat16):
        direct = [TeacherWindow.of(model(ids[None]).logits[0]).log_probs for ids in calib]
    for f, h, d in zip(full, half, direct, strict=True):
        assert torch.equal(h.log_probs, d) and not torch.equal(h.log_probs, f.log_probs)
        assert torch.allclose(h.log_probs.float(), f.log_probs.float(), atol=0.1)


def test_end_to_end_with_a_top_k_teacher_on_every_position_lowers_the_full_kl():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    base = QuantConfig.from_method("pt2+gptq+had+a4")
    e2e = EndToEndConfig(steps=30, lr=2e-2, holdout=0, eval_every=5, stride=1, top_k=16)
    plain, _ = quantize(tiny_llama(), base, calib, device="cpu", progress=False)
    model, report = quantize(tiny_llama(), replace(base, end_to_end=e2e), calib, device="cpu", progress=False)
    keep = kl_positions(32, 1)
    with torch.no_grad():
        teacher = tiny_llama()(calib).logits[:, keep]
        before, after = (_kl(teacher, m(calib).logits[:, keep]) / calib[:, keep].numel() for m in (plain, model))
    assert report.end_to_end["after"] < report.end_to_end["before"] < before  # the lower bound, lowered
    assert after < 0.8 * before
    assert QuantConfig.from_dict(replace(base, end_to_end=e2e).to_dict()).end_to_end == e2e


def test_a_negative_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k must be ≥ 0"):
        EndToEndConfig(top_k=-1)
