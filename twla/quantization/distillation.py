"""The end-to-end stage's objective: the KL divergence of the quantized model's next-token
distribution q from the full-precision model's p (the teacher), on every ``stride``-th position
of the calibration windows,

    Σ_t KL(p_t ‖ q_t) = Σ_t Σ_v p_t(v) log(p_t(v) / q_t(v)).

The teacher's log-probabilities are computed once, before quantization, and kept in float16.
All V of them cost 2·V bytes a position (96 KiB for a 49k vocabulary), so with ``top_k`` the
teacher keeps only its k most likely tokens K_t a position, and the objective compares the
distributions coarsened to those k tokens and one outcome R for the rest of the vocabulary,

    KL_k(p_t ‖ q_t) = Σ_{v ∈ K_t} p_t(v) log(p_t(v) / q_t(v)) + p_t(R) log(p_t(R) / q_t(R)),
    p_t(R) = 1 − Σ_{v ∈ K_t} p_t(v),

a lower bound of the full KL (coarsening loses information) that matches the teacher's top
tokens exactly and the tail's mass but not its shape — at 6·k bytes a position, cheap enough to
compare every position (``stride`` 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twla.quantization.tunables import products_in


def kl_positions(seqlen: int, stride: int) -> Tensor:
    """The positions whose next-token distributions the objective compares."""
    return torch.arange(0, seqlen, stride)


@dataclass
class TeacherWindow:
    """The teacher's next-token log-probabilities on one window's compared positions: all of
    them (P, V), or with ``tokens`` (P, k) the k most likely tokens' (P, k); float16."""

    log_probs: Tensor
    tokens: Tensor | None = None

    @classmethod
    def of(cls, logits: Tensor, top_k: int = 0) -> TeacherWindow:
        """From the teacher's logits (P, V) at the compared positions; ``top_k`` 0 keeps all V."""
        log_probs = torch.log_softmax(logits.float(), -1)
        if not 0 < top_k < log_probs.shape[-1]:
            return cls(log_probs.half().cpu())
        values, tokens = log_probs.topk(top_k, -1)
        return cls(values.half().cpu(), tokens.int().cpu())

    def kl(self, logits: Tensor) -> Tensor:
        """Σ over positions of KL (or KL_k, module docstring) of the student's ``logits`` (P, V)."""
        log_p = self.log_probs.to(logits.device, torch.float32)
        if self.tokens is None:
            return (log_p.exp() * (log_p - torch.log_softmax(logits.float(), -1))).sum()
        return _CoarseKL.apply(logits, log_p, self.tokens.to(logits.device, torch.long))


class _CoarseKL(torch.autograd.Function):
    """KL_k of the module docstring from the student's logits z (P, V), the teacher's top-k
    log-probabilities (P, k) and their tokens K, with its gradient written out. With
    e = exp(z − max z), S = Σ_v e_v, S_R = Σ_{v ∉ K} e_v (summed over the tail itself, so exact
    however small), q = e / S, q_R = S_R / S and P = Σ_K p + p_R,

        ∂KL_k/∂z_v = P·q_v − p_v  (v ∈ K),   e_v·(P/S − p_R/S_R)  (v ∉ K):

    one exponential of the logits kept for the backward pass, instead of the log-softmax, the
    tail's masked log-sum-exp and their gradients."""

    @staticmethod
    def forward(ctx, logits: Tensor, log_p: Tensor, tokens: Tensor) -> Tensor:
        z = logits.float()
        top = z.amax(-1, keepdim=True)
        e = (z - top).exp_()
        total = e.sum(-1, keepdim=True)
        e_top = e.gather(-1, tokens)
        rest = e.scatter_(-1, tokens, 0.0).sum(-1, keepdim=True)  # e now holds the tail only
        log_total = total.log()
        log_q = z.gather(-1, tokens) - top - log_total
        p = log_p.exp()
        p_top = p.sum(-1, keepdim=True)
        p_rest = (1 - p_top).clamp(min=0)
        ctx.save_for_backward(e, tokens, e_top, total, rest, p, p_rest, p_top + p_rest)
        ctx.dtype = logits.dtype
        kl_top = (p * (log_p - log_q)).sum()
        return kl_top + (torch.xlogy(p_rest, p_rest) - p_rest * (rest.log() - log_total)).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        e, tokens, e_top, total, rest, p, p_rest, mass = ctx.saved_tensors
        out = e * (grad * (mass / total - p_rest / rest))
        out.scatter_(-1, tokens, grad * (mass * e_top / total - p))
        return out.to(ctx.dtype), None, None


@torch.no_grad()
def teacher_log_probs(
    model: nn.Module,
    calibration: Tensor,
    stride: int,
    *,
    top_k: int = 0,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[TeacherWindow]:
    """The full-precision model's next-token log-probabilities at :func:`kl_positions` of every
    calibration window (CPU; call before quantizing), its matrix products in ``dtype`` (autocast;
    the weights stay as they are)."""
    keep = kl_positions(calibration.shape[1], stride).to(device)
    model.to(device)
    try:
        with products_in(dtype, device.type):
            return [
                TeacherWindow.of(model(ids[None].to(device), use_cache=False, logits_to_keep=keep).logits[0], top_k)
                for ids in tqdm(calibration, desc="teacher log-probs", disable=not progress)
            ]
    finally:
        model.to("cpu")
