"""Clipping calibration of per-token activation quantization.

For a layer with rotated calibration inputs X_R, full-precision weight W_R (rotated
basis) and its quantized weight Ŵ, the clipping ratio is chosen on a grid:

    p* = argmin_p ‖X_R W_Rᵀ − Q_{a,p}(X_R) Ŵᵀ‖²_F / ‖X_R W_Rᵀ‖²_F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twla.kernels.uniform import fake_quantize


@dataclass
class ClipChoice:
    """The chosen ratio and the relative output error at every ratio of the grid."""

    clip: float
    errors: dict[float, float]

    @property
    def error(self) -> float:
        return self.errors[self.clip]


@torch.no_grad()
def calibrate_clip(
    X: Tensor, W_ref: Tensor, W_hat: Tensor, *, bits: int, symmetric: bool, grid: tuple[float, ...]
) -> ClipChoice:
    """Pick p from ``grid`` minimizing the layer's relative output error (ties: the larger p).
    p = 1 (no clipping) is always evaluated, so ``errors[1.0]`` is the unclipped reference.

    X: (N, m) inputs as the weights see them (already rotated); W_ref, W_hat: (n, m).
    """
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError("clipping calibration needs a non-empty (tokens, features) input sample")
    X = X.float()
    target = X @ W_ref.float().T
    energy = max(float((target**2).sum()), 1e-30)
    W_hat = W_hat.float()
    errors = {}
    for p in sorted({1.0, *grid}, reverse=True):
        out = fake_quantize(X, bits, clip=p, symmetric=symmetric) @ W_hat.T
        errors[p] = float(((out - target) ** 2).sum()) / energy
    best = min(errors, key=lambda p: (errors[p], -p))
    return ClipChoice(best, errors)
