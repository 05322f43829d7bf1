"""Structured ternary codes of one weight block (TWLA's structured mode).

Per row i of a block W ∈ ℝ^{n×B}, every element belongs to one class c_ij:

- the k most salient columns of the block (saliency s_j = Σ_i W_ij² / [H⁻¹]_jj, shared
  by all rows) form the salient class, with two ternary planes:
  ŵ_ij = α_s t_ij + β u_ij + μ_s, t, u ∈ {−1, 0, +1} (9 levels);
- the other elements split, per row, into ``groups`` magnitude groups g (1 or 2), each a
  ternary grid of its own: ŵ_ij = α_g t_ij + μ_g (3 levels per group).

So each row of a block has the coefficients θ_i = (α_0…α_{C−1}, μ_0…μ_{C−1}, β), C the
number of classes, and each element an assignment a_ij = (c, t, u) with ŵ_ij = φ(a_ij)·θ_i,
φ(a) ∈ {−1, 0, 1}^{2C+1} (t in α_c's slot, 1 in μ_c's, u in β's). Two exact steps:

- coefficients given assignments, in a metric M (the identity, or the block's input
  metric): per row min_θ (w − θᵀΦ) M (w − θᵀΦ)ᵀ, i.e. (Φ M Φᵀ) θ = Φ M wᵀ
  (:func:`coefficients`);
- assignments given coefficients: each element to the nearest level of its column's
  class set (:func:`assign`).

Alternating them (Lloyd's algorithm on a structured codebook) never increases the
Euclidean error (:func:`fit`). Storage per (row, block): 16-bit coefficients; per
element 2 bits for t, 2 more for u in salient columns and 1 group bit elsewhere when
``groups == 2``; per block the salient column indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twla.solvers.ternary import ItfRule, itf, threshold_codes

LEVELS = torch.tensor([-1, 0, 1], dtype=torch.int8)
SPLIT_QUANTILE = 0.75  # the initial magnitude split: the top quarter of |w − μ| per row is the large group


@dataclass
class StructuredFit:
    """Assignments (n×B int8: class, plane-1 code t, plane-2 code u, 0 outside salient columns)
    and per-row coefficients α, μ (n×C) and β (n)."""

    classes: Tensor
    codes: Tensor
    residual: Tensor
    alpha: Tensor
    mu: Tensor
    beta: Tensor

    def dequantize(self) -> Tensor:
        """ŵ_ij = α_{i,c_ij} t_ij + μ_{i,c_ij} + β_i u_ij."""
        return dequantize(
            self.classes, self.codes, self.residual, self.alpha[:, None], self.mu[:, None], self.beta[:, None]
        )


def dequantize(classes: Tensor, codes: Tensor, residual: Tensor, alpha: Tensor, mu: Tensor, beta: Tensor) -> Tensor:
    """ŵ = α[c] t + μ[c] + β u for assignments (n, B), with α, μ (n, B, C) or (n, 1, C)
    gathered per element along the class axis, and β (n, B) or (n, 1)."""
    idx = classes.long().unsqueeze(-1)
    a = torch.gather(alpha.expand(*classes.shape, alpha.shape[-1]), -1, idx).squeeze(-1)
    m = torch.gather(mu.expand(*classes.shape, mu.shape[-1]), -1, idx).squeeze(-1)
    return a * codes.to(a.dtype) + m + beta * residual.to(a.dtype)


def salient_columns(W: Tensor, inv_diag: Tensor, k: int) -> Tensor:
    """Mask of the k columns with the largest saliency s_j = Σ_i W_ij² / d_j (d_j the
    diagonal of H⁻¹: the OBS cost of zeroing column j); ties go to the lower index."""
    mask = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    k = min(k, W.shape[1])
    if k:
        score = (W.to(torch.float64) ** 2).sum(0) / inv_diag.to(torch.float64).clamp(min=1e-300)
        mask[torch.sort(torch.topk(score, k).indices).values] = True
    return mask


def n_classes(groups: int, salient: Tensor) -> int:
    return groups + int(bool(salient.any()))


def features(classes: Tensor, codes: Tensor, residual: Tensor, *, n_class: int) -> Tensor:
    """Φ (n, 2C+1, B): the coefficient slots each element reads (t for α_c, 1 for μ_c, u for β)."""
    onehot = torch.nn.functional.one_hot(classes.long(), n_class).to(torch.float64).permute(0, 2, 1)
    t = codes.to(torch.float64)[:, None, :]
    return torch.cat([onehot * t, onehot, residual.to(torch.float64)[:, None, :]], dim=1)


def coefficients(W: Tensor, fit: StructuredFit, *, M: Tensor | None = None) -> StructuredFit:
    """Exact coefficients for fixed assignments: per row, min_θ (w − Φᵀθ) M (w − Φᵀθ)ᵀ, the
    normal equations (Φ M Φᵀ) θ = Φ M wᵀ solved by pseudo-inverse (a class without elements,
    or with constant codes, gets the minimum-norm solution). M defaults to the identity."""
    W = W.to(torch.float64)
    C = fit.alpha.shape[1]
    Phi = features(fit.classes, fit.codes, fit.residual, n_class=C)
    PM = Phi if M is None else Phi @ M.to(torch.float64)
    gram = PM @ Phi.transpose(1, 2)
    rhs = (PM @ W[:, :, None]).squeeze(-1)
    scale = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1).clamp(min=1e-300)[:, None, None]
    theta = (torch.linalg.pinv(gram / scale, rtol=1e-10, hermitian=True) @ (rhs[:, :, None] / scale)).squeeze(-1)
    return StructuredFit(fit.classes, fit.codes, fit.residual, theta[:, :C], theta[:, C : 2 * C], theta[:, 2 * C])


def _levels(fit: StructuredFit, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Candidate levels per row: non-salient (n, groups·3) and salient (n, 9), with the
    (class, t, u) of each candidate."""
    lv = LEVELS.to(fit.alpha.device, torch.float64)
    plain = (fit.alpha[:, :groups, None] * lv + fit.mu[:, :groups, None]).flatten(1)
    codes = LEVELS.long()
    plain_meta = torch.stack(
        [torch.arange(groups).repeat_interleave(3), codes.repeat(groups), torch.zeros(3 * groups, dtype=torch.long)]
    )
    s = fit.alpha.shape[1] - 1
    t, u = torch.meshgrid(lv, lv, indexing="ij")
    sal = fit.alpha[:, s, None] * t.flatten() + fit.beta[:, None] * u.flatten() + fit.mu[:, s, None]
    sal_meta = torch.stack([torch.full((9,), s), codes.repeat_interleave(3), codes.repeat(3)])
    return plain, sal, torch.cat([plain_meta, sal_meta], dim=1)


def assign(W: Tensor, fit: StructuredFit, salient: Tensor, groups: int) -> StructuredFit:
    """Nearest level for every element of W (n×b): among the ``groups`` ternary grids in
    non-salient columns, among the 9 two-plane levels in salient ones (``salient``: (b,) mask)."""
    plain, sal, meta = _levels(fit, groups)
    W = W.to(torch.float64)
    choice_plain = (W[:, :, None] - plain[:, None, :]).abs().argmin(-1)
    choice_sal = (W[:, :, None] - sal[:, None, :]).abs().argmin(-1) + plain.shape[1]
    choice = torch.where(salient[None, :], choice_sal, choice_plain)
    cls, t, u = (meta[r].to(W.device)[choice].to(torch.int8) for r in range(3))
    return StructuredFit(cls, t, u, fit.alpha, fit.mu, fit.beta)


def initial_fit(W: Tensor, salient: Tensor, groups: int, *, iters: int, rule: ItfRule = "lsq") -> StructuredFit:
    """A starting assignment: the ITF codes t of each row (``rule`` as in :func:`itf`); with two groups, the top
    quarter of |w − μ| per row in the large group; the second plane u of salient columns by
    TWN thresholding of the ITF residual. Coefficients by exact least squares."""
    W = W.to(torch.float64)
    base, _ = itf(W, iters=iters, rule=rule)
    classes = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
    if groups == 2:
        dev = (W - base.mu[:, None]).abs()
        cut = torch.quantile(dev, SPLIT_QUANTILE, dim=1, keepdim=True)
        classes[dev > cut] = 1
    residual = torch.zeros_like(base.codes)
    if salient.any():
        classes[:, salient] = groups
        r = (W - base.dequantize())[:, salient]
        residual[:, salient] = threshold_codes(r, 0.75 * r.abs().mean(dim=1))
    C = n_classes(groups, salient)
    empty = torch.zeros(W.shape[0], C, dtype=torch.float64, device=W.device)
    start = StructuredFit(classes, base.codes, residual, empty, empty, empty[:, 0])
    return coefficients(W, start)


def fit(
    W: Tensor, salient: Tensor, *, groups: int = 1, iters: int = 10, rule: ItfRule = "lsq"
) -> tuple[StructuredFit, list[float]]:
    """Euclidean structured fit min ‖W − Ŵ‖²_F: :func:`initial_fit`, then ``iters`` rounds of
    nearest-level assignment and exact coefficients. Returns the fit and the error after each
    round (non-increasing)."""
    if groups not in (1, 2):
        raise ValueError(f"structured ternary supports 1 or 2 magnitude groups, got {groups}")
    W = W.to(torch.float64)
    current = initial_fit(W, salient, groups, iters=iters, rule=rule)
    trace = []
    for _ in range(iters):
        current = coefficients(W, assign(W, current, salient, groups))
        trace.append(float(((W - current.dequantize()) ** 2).sum()))
    return current, trace
