"""Output reconstruction: tune continuous parameters θ of a quantized block (codes frozen)
so that its outputs match a full-precision reference on calibration windows,

    min_θ  Σ_{i ∈ train} ‖F_θ(X_i) − Y_i‖²_F / ē,      ē = mean_i ‖Y_i − X_i‖²_F,

with Adam on mini-batches of windows and early stopping on held-out windows: the held-out
error is measured before the first step and every ``eval_every`` steps, the best iterate
is kept, and the search stops after ``patience`` evaluations without improvement.

Each parameter is learned as a dimensionless step δ around its start, θ = θ₀ + s ⊙ δ with a
per-entry scale s (e.g. |α₀| for a ternary scale), so one learning rate fits tensors of
any magnitude. Rounding inside F (activation quantization) is differentiated with the
straight-through estimator by the caller's modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm


@dataclass
class Scaled:
    """A learnable tensor θ = base + scale ⊙ delta (delta starts at 0)."""

    base: Tensor
    scale: Tensor
    delta: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.delta = torch.zeros_like(self.base, requires_grad=True)

    def value(self) -> Tensor:
        return self.base + self.scale * self.delta


@dataclass
class ReconstructionResult:
    """Held-out relative error before and after, the traces, and where the best iterate was."""

    before: float
    after: float
    steps: int
    best_step: int
    train: list[float] = field(default_factory=list)  # mean training loss per evaluation period
    holdout: list[float] = field(default_factory=list)  # held-out error at steps 0, eval_every, …
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("before", "after", "steps", "best_step", "train", "holdout", "seconds")}


def reconstruct(
    params: list[Scaled],
    error: Callable[[int], Tensor],
    reference: Callable[[int], Tensor],
    *,
    train: list[int],
    holdout: list[int],
    steps: int,
    lr: float,
    batch: int = 1,
    eval_every: int = 10,
    patience: int = 2,
    generator: torch.Generator | None = None,
    project: Callable[[], None] | None = None,
    progress: bool = False,
) -> ReconstructionResult:
    """Minimize the summed output error over ``train`` windows (module docstring).

    error(i) returns ‖F_θ(X_i) − Y_i‖² for window i and reference(i) its scale ‖Y_i − X_i‖²
    (which needs no pass through F); without held-out windows the training windows judge the
    iterates. ``project`` runs after every step (e.g. to
    clamp a parameter into its domain); ``progress`` shows a bar over the steps. On return
    every parameter holds its best value.
    """
    if not train:
        raise ValueError("output reconstruction needs at least one training window")
    start = time.perf_counter()
    judge = holdout or train

    def relative(windows: list[int]) -> float:
        with torch.no_grad():
            errors = [error(i) for i in windows]
        return float(sum(errors) / max(float(sum(reference(i) for i in windows)), 1e-30))

    energy = max(sum(float(reference(i)) for i in train) / len(train), 1e-30)
    deltas = [p.delta for p in params]
    optimizer = torch.optim.Adam(deltas, lr=lr)
    best = [d.detach().clone() for d in deltas]
    scores = [relative(judge)]
    best_score, best_step, stale, losses, period = scores[0], 0, 0, [], []
    order = torch.randperm(len(train), generator=generator)
    cursor = 0
    for step in tqdm(range(1, steps + 1), desc="reconstruction steps", disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(batch):
            if cursor == len(order):
                order, cursor = torch.randperm(len(train), generator=generator), 0
            loss = error(train[int(order[cursor])]) / (energy * batch)
            loss.backward()
            total += float(loss.detach())
            cursor += 1
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                project()
        period.append(total)
        if step % eval_every and step != steps:
            continue
        losses.append(sum(period) / len(period))
        period = []
        scores.append(relative(judge))
        if scores[-1] < best_score:
            best_score, best_step, stale = scores[-1], step, 0
            best = [d.detach().clone() for d in deltas]
        else:
            stale += 1
            if stale >= patience:
                break
    with torch.no_grad():
        for d, b in zip(deltas, best, strict=True):
            d.copy_(b)
    return ReconstructionResult(
        scores[0], best_score, step if steps else 0, best_step, losses, scores, time.perf_counter() - start
    )
