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
        log_q = torch.log_softmax(logits.float(), -1)
        if self.tokens is None:
            return (log_p.exp() * (log_p - log_q)).sum()
        tokens = self.tokens.to(logits.device, torch.long)
        p = log_p.exp()
        top = (p * (log_p - log_q.gather(-1, tokens))).sum()
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        log_q_rest = log_q.scatter(-1, tokens, float("-inf")).logsumexp(-1)
        return top + (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest).sum()


@torch.no_grad()
def teacher_log_probs(
    model: nn.Module,
    calibration: Tensor,
    stride: int,
    *,
    top_k: int = 0,
    device: torch.device,
    progress: bool = False,
) -> list[TeacherWindow]:
    """The full-precision model's next-token log-probabilities at :func:`kl_positions` of every
    calibration window (CPU; call before quantizing)."""
    keep = kl_positions(calibration.shape[1], stride).to(device)
    model.to(device)
    try:
        return [
            TeacherWindow.of(model(ids[None].to(device), use_cache=False, logits_to_keep=keep).logits[0], top_k)
            for ids in tqdm(calibration, desc="teacher log-probs", disable=not progress)
        ]
    finally:
        model.to("cpu")
