"""Ternary weights of one linear layer: the block fit of a :class:`TernaryConfig`, the
GPTQ-compensated layer quantizer, and the stored record (codes, per-(row, block) α, μ)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from twla.config import TernaryConfig
from twla.solvers.gptq import BlockFit, GPTQResult, gptq, sequential_round
from twla.solvers.ternary import TernaryFit, absmean, codes_given_grid, itf, refit_metric, twn


@dataclass
class TernaryWeight:
    """W ≈ α[:, block(j)] T[:, j] + μ[:, block(j)], block j = columns perm[j·B:(j+1)·B]."""

    codes: Tensor  # int8 (n, m), original column order
    alpha: Tensor  # (n, n_blocks)
    mu: Tensor  # (n, n_blocks)
    perm: Tensor  # (m,) column order of the blocks
    block_size: int
    has_offset: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def block_of_column(self) -> Tensor:
        index = torch.empty_like(self.perm)
        index[self.perm] = torch.arange(self.perm.numel()) // self.block_size
        return index

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        b = self.block_of_column()
        return (self.alpha[:, b] * self.codes.to(self.alpha.dtype) + self.mu[:, b]).to(dtype)

    def is_reordered(self) -> bool:
        return bool((self.perm != torch.arange(self.perm.numel())).any())


def block_fitter(cfg: TernaryConfig) -> BlockFit:
    """The per-block fit of ``cfg``:

    1. stage 1, the Euclidean fit (absmean / TWN / ITF) of the block's grid and codes;
    2. with compensation, GPTQ rounding: codes re-assigned column by column on the
       stage-1 grid with intra-block error feedback (:func:`sequential_round`);
    3. optionally stage 2, the exact refit of (α, μ) in the block's metric M (DESIGN §3.3).

    Returns the block's dequantized values, the dequantized fit after each stage, and the fit.
    """

    def fit(Wb: Tensor, metric: Tensor, Pbb: Tensor | None) -> tuple[Tensor, dict[str, Tensor], TernaryFit]:
        if cfg.quantizer == "absmean":
            result = absmean(Wb)
        elif cfg.quantizer == "twn":
            result = twn(Wb)
        else:
            result, _ = itf(Wb, cfg.itf_iters, cfg.itf_rule)
        stages = {cfg.quantizer if cfg.quantizer != "atq" else "itf": result.dequantize()}
        if Pbb is not None:
            alpha, mu = result.alpha, result.mu

            def round_column(w: Tensor, j: int) -> Tensor:
                return alpha * codes_given_grid(w[:, None], alpha, mu).squeeze(1) + mu

            Q = sequential_round(Wb, Pbb, round_column)
            result = TernaryFit(codes_given_grid(Q, alpha, mu), alpha, mu)
            stages["gptq-round"] = result.dequantize()
        if cfg.refit:
            result = TernaryFit(result.codes, *refit_metric(Wb, result.codes, metric))
            stages["refit"] = result.dequantize()
        return result.dequantize(), stages, result

    return fit


def quantize_weight(W: Tensor, S: Tensor, cfg: TernaryConfig) -> tuple[TernaryWeight, GPTQResult]:
    """Ternarize one weight W (n×m) given its input statistics S (m×m).

    The solver runs in float64 on S's device; the returned weight lives on the CPU.
    """
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or inf values")
    res = gptq(W, S, block_fitter(cfg), cfg.block_size, cfg.compensate, cfg.reorder, cfg.damp)
    fits: list[TernaryFit] = res.payloads
    perm = torch.cat(res.blocks).cpu()
    codes = torch.empty(W.shape, dtype=torch.int8)
    for cols, f in zip(res.blocks, fits):
        codes[:, cols.cpu()] = f.codes.cpu()
    # α and μ are stored in 16 bits: round them so the model is exactly what is stored
    alpha = torch.stack([f.alpha for f in fits], dim=1).half().float().cpu()
    mu = torch.stack([f.mu for f in fits], dim=1).half().float().cpu()
    return TernaryWeight(codes, alpha, mu, perm, cfg.block_size, cfg.has_offset), res
