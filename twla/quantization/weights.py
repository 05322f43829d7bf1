"""Quantized weights of one linear layer: the block fit of a weight config, the
GPTQ-compensated layer quantizer, and the stored record (codes plus per-(row, block)
α, μ for ternary weights, the assignments and per-class coefficients of structured ternary
weights, or scale and zero point for uniform integer weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from twla.kernels.trits import trit_bytes
from twla.kernels.uniform import quantize_codes, uniform_grid
from twla.quantization.sections import TernaryConfig, UniformConfig, WeightConfig
from twla.solvers import structured
from twla.solvers.gptq import BlockFit, GPTQResult, gptq, sequential_round
from twla.solvers.structured import StructuredFit
from twla.solvers.ternary import TernaryFit, absmean, codes_given_grid, itf, refit_metric, twn

SCALE_BITS = 16  # α, μ and uniform scales are stored as 16-bit floats
INDEX_BITS = 16  # one column index per input when the blocks are reordered


def ternary_code_bits(n: int, m: int, entropy: bool = False) -> float:
    """Bits of an (n, m) plane of ternary codes: stored five a byte in base 3 along each row
    (:mod:`twla.kernels.trits`, 1.6 bits a code), or log2 3 a code in entropy terms."""
    return n * m * math.log2(3) if entropy else float(8 * n * trit_bytes(m))


@dataclass
class BlockWeight:
    """Codes of a linear weight quantized in blocks of columns: block j = columns perm[j·B:(j+1)·B]."""

    codes: Tensor  # integer codes (n, m), original column order
    perm: Tensor  # (m,) column order of the blocks
    block_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def block_of_column(self) -> Tensor:
        index = torch.empty_like(self.perm)
        index[self.perm] = torch.arange(self.perm.numel()) // self.block_size
        return index

    def per_column(self, *grids: Tensor) -> list[Tensor]:
        """x[:, block(j)] for every column j of each per-(row, block) tensor x (n, n_blocks, …):
        x spread over the columns (n, m, …), as a product with the (n_blocks, m) block indicator —
        exact, and its gradient a product too (much faster than an indexed gather's scatter)."""
        blocks = self.block_of_column()
        indicator = torch.nn.functional.one_hot(blocks, grids[0].shape[1]).to(grids[0]).T
        return [(x.movedim(1, -1) @ indicator.to(x)).movedim(-1, 1) for x in grids]

    def is_reordered(self) -> bool:
        return bool((self.perm != torch.arange(self.perm.numel())).any())

    def index_bits(self) -> int:
        return self.shape[1] * INDEX_BITS if self.is_reordered() else 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Ŵ on the stored grid (``grid``/``with_grid`` of the subclass)."""
        return self.with_grid(**self.grid()).to(dtype)

    def grid_magnitudes(self) -> dict[str, Tensor]:
        """Per-entry magnitude of each grid tensor, the unit its reconstruction steps are taken
        in: |α| (or the |scale|) for the scale and for the offset."""
        grid = self.grid()
        unit = next(iter(grid.values())).abs()
        return {k: unit for k in grid}


@dataclass
class TernaryWeight(BlockWeight):
    """W ≈ α[:, block(j)] T[:, j] + μ[:, block(j)] with T ∈ {−1, 0, +1} (int8 codes)."""

    alpha: Tensor  # (n, n_blocks)
    mu: Tensor  # (n, n_blocks)
    has_offset: bool

    packed_format: ClassVar[str | None] = "ternary"  # the packed linear that holds it (twla.deploy.linears)

    def grid(self) -> dict[str, Tensor]:
        """The continuous parameters: α, and μ when the grid has an offset."""
        return {"alpha": self.alpha, "mu": self.mu} if self.has_offset else {"alpha": self.alpha}

    def with_grid(self, alpha: Tensor, mu: Tensor | None = None, codes: Tensor | None = None) -> Tensor:
        """Ŵ on the grid (α, μ) with this weight's codes, or with ``codes`` (float, e.g. learned
        codes under a straight-through estimator); differentiable in α, μ and ``codes``."""
        a, m = self.per_column(alpha, self.mu.to(alpha) if mu is None else mu)
        return torch.addcmul(m, a, (self.codes if codes is None else codes).to(a.dtype))

    def set_grid(self, alpha: Tensor, mu: Tensor | None = None) -> None:
        """Store a new grid, rounded to the 16 bits it is stored in."""
        self.alpha = alpha.detach().half().float().cpu()
        if mu is not None:
            self.mu = mu.detach().half().float().cpu()

    def code_bits(self, entropy: bool = False) -> float:
        """Bits of all codes: five a byte in base 3 along each row as stored, log2 3 each in entropy terms."""
        return ternary_code_bits(*self.codes.shape, entropy)

    def side_bits(self) -> int:
        """α (and μ) per (row, block), and the permutation."""
        return (self.alpha.numel() + self.has_offset * self.mu.numel()) * SCALE_BITS + self.index_bits()


@dataclass
class UniformWeight(BlockWeight):
    """W ≈ s[:, block(j)] (C[:, j] − z[:, block(j)]) with integer codes C ∈ [0, 2^bits − 1]."""

    scale: Tensor  # (n, n_blocks)
    zero: Tensor  # (n, n_blocks), integer-valued
    bits: int

    packed_format: ClassVar[str | None] = "integer"

    def grid(self) -> dict[str, Tensor]:
        """The continuous parameter: the scale (the zero point is an integer code)."""
        return {"scale": self.scale}

    def with_grid(self, scale: Tensor) -> Tensor:
        """Ŵ with this weight's codes and zero points at ``scale`` (differentiable in it)."""
        s, z = self.per_column(scale, self.zero.to(scale))
        return s * (self.codes.to(s.dtype) - z)

    def set_grid(self, scale: Tensor) -> None:
        """Store a new scale, rounded to the 16 bits it is stored in."""
        self.scale = scale.detach().half().float().cpu()

    def code_bits(self, entropy: bool = False) -> float:
        return float(self.codes.numel() * self.bits)

    def side_bits(self) -> int:
        """A 16-bit scale and a ``bits``-bit zero point per (row, block), and the permutation."""
        return self.scale.numel() * (SCALE_BITS + self.bits) + self.index_bits()


@dataclass
class StructuredWeight(BlockWeight):
    """Structured ternary (:mod:`twla.solvers.structured`): W ≈ α[:, b, c] T + μ[:, b, c] + β[:, b] U
    with b = block(j), c = ``classes`` (the magnitude group, or the salient class in the
    block's salient columns), T the plane-1 codes (``codes``) and U the plane-2 codes
    (``residual``, 0 outside salient columns)."""

    classes: Tensor  # (n, m) int8
    residual: Tensor  # (n, m) int8
    alpha: Tensor  # (n, n_blocks, C)
    mu: Tensor  # (n, n_blocks, C)
    beta: Tensor  # (n, n_blocks)
    groups: int  # magnitude groups outside the salient columns (1 or 2)

    packed_format: ClassVar[str | None] = None  # fake-quantized only: the kernels read plain ternary codes

    def grid(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha, "mu": self.mu, "beta": self.beta}

    def grid_magnitudes(self) -> dict[str, Tensor]:
        """|α| for α and μ, |β| for β."""
        return {"alpha": self.alpha.abs(), "mu": self.alpha.abs(), "beta": self.beta.abs()}

    def with_grid(self, alpha: Tensor, mu: Tensor, beta: Tensor) -> Tensor:
        return structured.dequantize(self.classes, self.codes, self.residual, *self.per_column(alpha, mu, beta))

    def set_grid(self, alpha: Tensor, mu: Tensor, beta: Tensor) -> None:
        self.alpha, self.mu, self.beta = (v.detach().half().float().cpu() for v in (alpha, mu, beta))

    def salient(self) -> Tensor:
        """(m,) mask of the salient columns (their class is the last one)."""
        if self.alpha.shape[-1] == self.groups:
            return torch.zeros(self.shape[1], dtype=torch.bool)
        return (self.classes == self.groups).all(dim=0)

    def code_bits(self, entropy: bool = False) -> float:
        """Plane-1 codes everywhere, plane-2 codes in salient columns (:func:`ternary_code_bits`
        each), and one group bit per non-salient weight with two groups."""
        n, m = self.shape
        salient = int(self.salient().sum())
        planes = ternary_code_bits(n, m, entropy) + ternary_code_bits(n, salient, entropy)
        return planes + (self.groups > 1) * n * (m - salient)

    def side_bits(self) -> int:
        """16-bit coefficients per (row, block) for every class (and β with salient columns),
        ⌈log2 B⌉ bits per salient column index of each block, and the permutation."""
        with_salient = self.alpha.shape[-1] > self.groups
        coeffs = self.alpha.numel() + self.mu.numel() + with_salient * self.beta.numel()
        salient = self.salient()[self.perm]  # in block order
        index = sum(
            int(salient[s : s + self.block_size].sum()) * math.ceil(math.log2(len(salient[s : s + self.block_size])))
            for s in range(0, len(salient), self.block_size)
        )
        return coeffs * SCALE_BITS + index + self.index_bits()


QuantizedWeight = TernaryWeight | UniformWeight | StructuredWeight


def stored_bits(cfg: WeightConfig, shape: tuple[int, int]) -> int:
    """Bits an (n, m) weight quantized with plain ternary or uniform ``cfg`` stores, known before
    it is quantized: its codes and grid (and the column order with ``reorder``), as
    ``code_bits() + side_bits()`` of the quantized weight count them."""
    n, m = shape
    grids = n * math.ceil(m / cfg.block_size)
    order = m * INDEX_BITS if cfg.reorder else 0
    if isinstance(cfg, UniformConfig):
        return n * m * cfg.bits + grids * (SCALE_BITS + cfg.bits) + order
    if cfg.structured:
        raise ValueError("structured ternary weights store data-dependent bits (their salient columns)")
    return int(ternary_code_bits(n, m)) + grids * SCALE_BITS * (1 + cfg.has_offset) + order


def structured_block_fitter(cfg: TernaryConfig) -> BlockFit:
    """The per-block fit of structured ternary weights (:mod:`twla.solvers.structured`):

    1. the block's ``cfg.salient`` most salient columns, s_j = Σ_i W_ij² / [H⁻¹]_jj (the
       diagonal of the compensation's H⁻¹ block, or 1/H_jj without compensation);
    2. stage 1, the Euclidean structured fit (ITF start, then nearest levels / exact
       coefficients);
    3. with compensation, GPTQ rounding: each column to its nearest level on the stage-1
       coefficients, with intra-block error feedback;
    4. optionally stage 2, the exact coefficients in the block's metric M.
    """

    def fit(Wb: Tensor, metric: Tensor, Pbb: Tensor | None) -> tuple[Tensor, dict[str, Tensor], StructuredFit]:
        inv_diag = torch.diagonal(Pbb) if Pbb is not None else 1 / torch.diagonal(metric)
        salient = structured.salient_columns(Wb, inv_diag, cfg.salient)
        result, _ = structured.fit(Wb, salient, groups=cfg.groups, iters=cfg.itf_iters, rule=cfg.itf_rule)
        stages = {"structured": result.dequantize()}
        if Pbb is not None:
            classes, codes, residual = (torch.empty_like(result.codes) for _ in range(3))

            def round_column(w: Tensor, j: int) -> Tensor:
                a = structured.assign(w[:, None], result, salient[j : j + 1], cfg.groups)
                classes[:, j], codes[:, j], residual[:, j] = a.classes[:, 0], a.codes[:, 0], a.residual[:, 0]
                return a.dequantize()[:, 0]

            sequential_round(Wb, Pbb, round_column)
            result = StructuredFit(classes, codes, residual, result.alpha, result.mu, result.beta)
            stages["gptq-round"] = result.dequantize()
        if cfg.refit:
            result = structured.coefficients(Wb, result, M=metric)
            stages["refit"] = result.dequantize()
        return result.dequantize(), stages, result

    return fit


def ternary_block_fitter(cfg: TernaryConfig) -> BlockFit:
    """The per-block fit of a ternary ``cfg``:

    1. stage 1, the Euclidean fit (absmean / TWN / ITF) of the block's grid and codes;
    2. with compensation, GPTQ rounding: codes re-assigned column by column on the
       stage-1 grid with intra-block error feedback (:func:`sequential_round`);
    3. optionally stage 2, the exact refit of (α, μ) in the block's metric M.

    Returns the block's dequantized values, the dequantized fit after each stage, and the fit.
    """

    def fit(Wb: Tensor, metric: Tensor, Pbb: Tensor | None) -> tuple[Tensor, dict[str, Tensor], TernaryFit]:
        if cfg.quantizer == "absmean":
            result = absmean(Wb)
        elif cfg.quantizer == "twn":
            result = twn(Wb)
        else:
            result, _ = itf(Wb, iters=cfg.itf_iters, rule=cfg.itf_rule)
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


@dataclass
class UniformFit:
    """Integer codes (n×B) of one block with per-row scale and zero point."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def uniform_block_fitter(cfg: UniformConfig) -> BlockFit:
    """Per-block min-max grid (scale rounded to 16 bits), then round to nearest, or GPTQ's
    column-by-column rounding on that grid when compensating."""

    def fit(Wb: Tensor, metric: Tensor, Pbb: Tensor | None) -> tuple[Tensor, dict[str, Tensor], UniformFit]:
        scale, zero = uniform_grid(Wb, cfg.bits)
        scale = scale.half().to(Wb.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # rows below fp16's range: all codes at 0

        def dequant(codes: Tensor, s: Tensor, z: Tensor) -> Tensor:
            return s * (codes - z)

        codes = quantize_codes(Wb, scale, zero, bits=cfg.bits, symmetric=False)
        stages = {"rtn": dequant(codes, scale, zero)}
        if Pbb is not None:

            def round_column(w: Tensor, j: int) -> Tensor:
                return dequant(
                    quantize_codes(w[:, None], scale, zero, bits=cfg.bits, symmetric=False), scale, zero
                ).squeeze(1)

            Q = sequential_round(Wb, Pbb, round_column)
            codes = quantize_codes(Q, scale, zero, bits=cfg.bits, symmetric=False)
            stages["gptq-round"] = dequant(codes, scale, zero)
        return dequant(codes, scale, zero), stages, UniformFit(codes, scale.squeeze(1), zero.squeeze(1))

    return fit


def block_fitter(cfg: WeightConfig) -> BlockFit:
    """The per-block fit of a weight config (ternary or uniform)."""
    if isinstance(cfg, UniformConfig):
        return uniform_block_fitter(cfg)
    return structured_block_fitter(cfg) if cfg.structured else ternary_block_fitter(cfg)


def quantize_weight(W: Tensor, S: Tensor, cfg: WeightConfig) -> tuple[QuantizedWeight, GPTQResult]:
    """Quantize one weight W (n×m) given its input statistics S (m×m).

    The solver runs in float64 on S's device; the returned weight lives on the CPU.
    """
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or inf values")
    res = gptq(
        W,
        S,
        block_fitter(cfg),
        block_size=cfg.block_size,
        compensate=cfg.compensate,
        reorder=cfg.reorder,
        damp=cfg.damp,
    )
    perm = torch.cat(res.blocks).cpu()

    def assembled(attr: str, dtype: torch.dtype = torch.int8) -> Tensor:
        """An (n, m) code tensor of the block payloads in the original column order."""
        out = torch.empty(W.shape, dtype=dtype)
        for cols, f in zip(res.blocks, res.payloads, strict=True):
            out[:, cols.cpu()] = getattr(f, attr).cpu().to(dtype)
        return out

    def side(attr: str) -> Tensor:
        return torch.stack([getattr(f, attr) for f in res.payloads], dim=1).float().cpu()

    codes = assembled("codes", torch.int8 if isinstance(cfg, TernaryConfig) else torch.uint8)
    if isinstance(cfg, UniformConfig):
        return UniformWeight(codes, perm, cfg.block_size, side("scale"), side("zero"), cfg.bits), res
    # the grid is stored in 16 bits: round it so the model is exactly what is stored
    alpha, mu = side("alpha").half().float(), side("mu").half().float()
    if cfg.structured:
        beta = side("beta").half().float()
        planes = assembled("classes"), assembled("residual")
        return StructuredWeight(codes, perm, cfg.block_size, *planes, alpha, mu, beta, cfg.groups), res
    return TernaryWeight(codes, perm, cfg.block_size, alpha, mu, cfg.has_offset), res
