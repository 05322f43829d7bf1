"""The sections of a quantization configuration: how weights and activations are quantized,
how inputs are rotated, how blocks are reconstructed and activation bits allocated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from twla.kernels.uniform import ACTIVATION_BITS
from twla.solvers.bits import SOLVERS as BIT_SOLVERS
from twla.solvers.bits.problem import check_mean_budget
from twla.solvers.stiefel import StiefelSolver
from twla.solvers.ternary import ItfRule

Quantizer = Literal["absmean", "twn", "atq"]


Granularity = Literal["block", "site"]


CostMetric = Literal["kl", "loss"]
CostSource = Literal["measured", "fisher"]  # how an activation allocation gets its unary costs
Precision = Literal["float32", "bfloat16", "auto"]  # of a reconstruction's matrix products


# The weight formats a weight allocation may give a linear: the method's own ternary weights,
# or uniform integer weights of 2, 3, 4 or 8 bits with the same block size and compensation.
WEIGHT_FORMATS = ("ternary", "int2", "int3", "int4", "int8")

# The bit solvers that take the stored-bits budget (an extra resource) of a weight allocation.
WEIGHT_SOLVERS = ("milp", "scip", "cp-sat", "cvxpy")


def check_choice(what: str, value: object, allowed: object) -> None:
    """Refuse ``value`` unless it is one of the values of the ``Literal`` type ``allowed``."""
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, options))}")


@dataclass(frozen=True)
class TernaryConfig:
    """Ternarization of every linear weight in blocks of ``block_size`` input columns.

    quantizer: stage 1 fit per (row, block): ``absmean``, ``twn`` or ``atq`` (ITF).
    itf_rule / itf_iters: ITF code-update rule (``lsq`` PT²-LLM, ``twn`` TWLA) and iterations.
    refit: stage 2, the exact refit of (α, μ) in the layer-input metric (AGA / E2M).
    compensate: GPTQ error compensation; reorder: SSR block order; damp: λ of H = S + λ·mean(diag S)·I.
    salient / groups: structured ternary (:mod:`twla.solvers.structured`): per block, the ``salient``
    most salient columns get a second ternary plane, and the other weights of each row split
    into ``groups`` magnitude groups with their own (α, μ); 0 and 1 are plain ternary.
    """

    quantizer: Quantizer = "atq"
    itf_rule: ItfRule = "lsq"
    itf_iters: int = 10
    refit: bool = True
    block_size: int = 128
    compensate: bool = True
    reorder: bool = False
    damp: float = 0.01
    salient: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        check_choice("quantizer", self.quantizer, Quantizer)
        check_choice("ITF rule", self.itf_rule, ItfRule)
        if self.block_size < 1 or self.itf_iters < 0 or self.damp < 0:
            raise ValueError("block_size must be ≥ 1, itf_iters ≥ 0 and damp ≥ 0")
        if self.salient < 0 or self.groups not in (1, 2):
            raise ValueError(
                f"structured ternary needs salient ≥ 0 and groups 1 or 2, got {self.salient}, {self.groups}"
            )
        if self.structured and self.quantizer != "atq":
            raise ValueError(f"structured ternary codes start from ITF (pt2 or e2m), not from {self.quantizer}")

    kind: ClassVar[str] = "ternary"  # the weight format's name in configuration dicts

    @property
    def structured(self) -> bool:
        """Whether blocks have salient two-plane columns or several magnitude groups."""
        return self.salient > 0 or self.groups > 1

    @property
    def packable(self) -> bool:
        """Whether the packed checkpoint format holds these weights (plain ternary, not structured)."""
        return not self.structured

    @property
    def format(self) -> str:
        """The weight format in words."""
        if not self.structured:
            return "ternary"
        return f"structured ternary ({self.salient} salient columns per block, {self.groups} magnitude groups)"

    @property
    def has_offset(self) -> bool:
        """Whether the grid stores a per-(row, block) offset μ besides the scale α."""
        return self.quantizer == "atq" or self.refit

    @property
    def label(self) -> str:
        """The weight part of a W·A· scheme label."""
        return "W1.58s" if self.structured else "W1.58"


@dataclass(frozen=True)
class UniformConfig:
    """Uniform integer weights: per (row, group of ``block_size`` columns) min-max grid with a
    16-bit scale and a ``bits``-bit zero point; round to nearest, or GPTQ with ``compensate``."""

    bits: int = 4
    block_size: int = 128
    compensate: bool = False
    reorder: bool = False
    damp: float = 0.01

    kind: ClassVar[str] = "uniform"
    packable: ClassVar[bool] = True  # packed as integer linears

    @property
    def format(self) -> str:
        return f"{self.bits}-bit uniform integer (a reference method)"

    @property
    def label(self) -> str:
        return f"W{self.bits}"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 6, 8):
            raise ValueError(f"uniform weights support 2, 3, 4, 6 or 8 bits, got {self.bits}")
        if self.block_size < 1 or self.damp < 0:
            raise ValueError("block_size must be ≥ 1 and damp ≥ 0")


WeightConfig = TernaryConfig | UniformConfig


SiteRotation = Literal["none", "hadamard", "random", "kotms"]


ResidualRotation = Literal["none", "hadamard", "random"]


FactorInit = Literal["identity", "random", "hadamard"]


@dataclass(frozen=True)
class KotmsConfig:
    """The KOTMS problem of a learned site rotation: ``steps`` of ``solver`` at step size ``lr``
    on the tri-modal loss of ``rows`` evenly spaced weight rows per site, the ternary-fit term
    weighted by ``balance``; activation_weight γ > 0 adds γ times the expected relative 4-bit
    quantization noise of X R on ``activation_tokens`` full-precision calibration inputs per
    site (modifier ``act``, γ = 10). With ``gate``, a layer keeps its learned rotation only
    where it lowers the site's combined weight-and-activation output error
    (:func:`twla.solvers.kotms.site_errors`) against the starting rotation, judged on another
    ``activation_tokens`` calibration inputs; otherwise it keeps the start."""

    solver: StiefelSolver = "riemannian-adam"
    steps: int = 100
    lr: float = 5e-2
    balance: float = 0.1
    rows: int = 128
    activation_weight: float = 0.0
    activation_tokens: int = 256
    gate: bool = True

    def __post_init__(self) -> None:
        check_choice("KOTMS solver", self.solver, StiefelSolver)
        if self.steps < 0 or self.lr <= 0 or self.rows < 1:
            raise ValueError("KOTMS steps must be ≥ 0, lr > 0 and rows ≥ 1")
        if self.activation_weight < 0 or self.activation_tokens < 1:
            raise ValueError("KOTMS activation_weight must be ≥ 0 and activation_tokens ≥ 1")


@dataclass(frozen=True)
class RelocationConfig:
    """E2M stage 2 on a site's rotation: ``steps`` of ``solver`` at step size ``lr`` on the
    site's ternarized output error in the layer-input metric, starting from the site rotation."""

    solver: StiefelSolver = "riemannian-adam"
    steps: int = 20
    lr: float = 5e-3

    def __post_init__(self) -> None:
        check_choice("relocation solver", self.solver, StiefelSolver)
        if self.steps < 0 or self.lr <= 0:
            raise ValueError("relocation steps must be ≥ 0 and lr > 0")


@dataclass(frozen=True)
class RotationConfig:
    """Orthogonal rotations of the linear layers' inputs.

    site: one online Kronecker rotation R = R₁ ⊗ R₂ per input site (q/k/v, o, gate/up, down),
    ``hadamard`` / ``random`` fixed, ``kotms`` learned (the problem in ``kotms``) starting
    from ``init``; the weight side is fused offline (W ← W R).
    relocation: when set, E2M stage-2 relocation of each site's factors against its
    ternarized output error, starting from the site rotation (identity when ``site="none"``).
    residual: offline residual-stream rotation with RMSNorm folding (QuaRot's R1).
    factors: optional {dimension: (m₁, m₂)} overrides of the Kronecker factor sizes.
    """

    site: SiteRotation = "none"
    residual: ResidualRotation = "none"
    init: FactorInit = "hadamard"
    kotms: KotmsConfig = field(default_factory=KotmsConfig)
    relocation: RelocationConfig | None = None
    factors: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("rotation site", self.site, SiteRotation)
        check_choice("rotation residual", self.residual, ResidualRotation)
        check_choice("rotation init", self.init, FactorInit)

    @property
    def online(self) -> bool:
        """Whether the linear layers get online input rotations."""
        return self.site != "none" or self.relocation is not None


@dataclass(frozen=True)
class ActivationConfig:
    """Per-token dynamic fake quantization of every quantized linear layer's input.

    bits: the uniform bit-width; layer_bits: per-layer overrides {linear name: bits}, e.g.
    from a mixed-precision allocation. The clipping ratio p of each layer is chosen from
    ``clip_grid`` to minimize that layer's output error on ``calibration_tokens`` tokens.
    """

    bits: int = 16
    symmetric: bool = False
    layer_bits: Mapping[str, int] = field(default_factory=dict)
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
    calibration_tokens: int = 1024

    def __post_init__(self) -> None:
        for name, bits in {"bits": self.bits, **self.layer_bits}.items():
            if bits not in ACTIVATION_BITS:
                raise ValueError(f"activation bits for {name}: {bits} is not one of {ACTIVATION_BITS}")
        if not self.clip_grid or not all(0 < p <= 1 for p in self.clip_grid):
            raise ValueError("clip_grid must be a non-empty sequence of ratios in (0, 1]")
        if self.calibration_tokens < 1:
            raise ValueError("calibration_tokens must be ≥ 1")

    def bits_for(self, name: str) -> int:
        return self.layer_bits.get(name, self.bits)

    @property
    def quantized(self) -> bool:
        return self.bits < 16 or any(b < 16 for b in self.layer_bits.values())


# Calibration windows of the layer-wise pass by default: GPTQ, clipping and block-wise
# reconstruction gain little from more, end-to-end reconstruction takes every window given.
LAYER_WINDOWS = 32


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block-wise output reconstruction after each decoder block is quantized (codes frozen).

    Tunes the block's ``grid`` (α, μ per (row, block), or uniform scales), its ``norms``
    (RMSNorm gains) and its activation ``clips`` (straight-through) to minimize the block's
    output error against the full-precision block on the same inputs (from the quantized
    prefix): Adam, ``steps`` steps of ``batch`` windows, learning rate ``lr`` on steps
    relative to each parameter's magnitude, early stopping on the last ``holdout``
    calibration windows (checked every ``eval_every`` steps, ``patience`` checks).

    codes: also learn the ternary codes (learned rounding). Each weight gets an offset
    V ∈ [−1, 1] on its code T₀ from the layer-wise solve; the block runs with
    T = clamp(round(T₀ + V), −1, 1), differentiated straight through, so a code moves at most one
    level when its offset passes ±½. Adam moves an offset by about ``code_lr`` per step.

    precision: the type of the solve's matrix products. ``bfloat16`` runs the forward passes under
    autocast (8-bit mantissas, float32 accumulation; θ, Adam's state and the loss stay float32);
    ``auto`` takes bfloat16 where the device multiplies it natively (a CUDA GPU with bfloat16, a CPU
    with AMX or AVX-512 BF16) and float32 elsewhere (:func:`matmul_dtype`).
    """

    steps: int = 50
    lr: float = 5e-3
    batch: int = 1
    holdout: int = 4
    eval_every: int = 10
    patience: int = 2
    grid: bool = True
    norms: bool = True
    clips: bool = True
    codes: bool = False
    code_lr: float = 0.02
    seed: int = 0
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        check_choice("reconstruction precision", self.precision, Precision)
        if self.steps < 0 or self.lr <= 0 or min(self.batch, self.eval_every, self.patience) < 1 or self.holdout < 0:
            raise ValueError("reconstruction needs steps ≥ 0, lr > 0, batch, eval_every, patience ≥ 1, holdout ≥ 0")
        if self.code_lr <= 0:
            raise ValueError(f"reconstruction code_lr must be > 0, got {self.code_lr}")
        if not (self.grid or self.norms or self.clips or self.codes):
            raise ValueError("reconstruction has nothing to tune: enable grid, norms, clips or codes")

    def check_windows(self, windows: int) -> None:
        """Refuse a calibration set that leaves no training window beside the held-out ones."""
        if windows <= self.holdout:
            raise ValueError(
                f"reconstruction holds out {self.holdout} of the {windows} calibration windows and "
                f"needs at least one more to train on; use more calibration windows or a smaller holdout"
            )


@dataclass(frozen=True)
class EndToEndConfig(ReconstructionConfig):
    """End-to-end reconstruction once every block is quantized: the same parameters as
    :class:`ReconstructionConfig`, of all blocks at once, tuned to minimize the KL divergence
    of the quantized model's next-token distribution from the full-precision model's,

        min_θ Σ_i Σ_t KL(p_FP(· | x_i,<t) ‖ p_θ(· | x_i,<t)),

    on every ``stride``-th position of the calibration windows. The full-precision
    log-probabilities are computed before quantization and kept in float16: all of them, or with
    ``top_k`` > 0 the k most likely tokens' (the KL of the distributions coarsened to those tokens
    and the rest, :mod:`twla.quantization.distillation`). The whole model sits on the device during
    the solve. The stage is short of data rather than steps, so its defaults compare every
    position against the teacher's 64 top tokens (4× the positions of every 4th position against
    all tokens, at 1/64 of the memory for a 49k vocabulary) and take 400 steps of one window from
    the run's 252 training windows (each seen about 1.6 times; the held-out KL still falls at
    step 300), stopping after 8 checks without improvement (the held-out KL of 4 windows is
    noisy: with 4, a run that was still learning stopped at step 180). Its matrix products, the
    teacher's included, are bfloat16 where the device multiplies them natively (``precision``
    auto), with the same quality as float32 at about 0.6 of the time on a 2-core CPU with AMX
    (400 steps of a 135M model and their checks take about 18 minutes there; a bfloat16 teacher
    is 0.0006 nats a position from a float32 one, at half its time).
    """

    steps: int = 400
    lr: float = 2e-3
    patience: int = 8
    stride: int = 1
    top_k: int = 64
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride < 1:
            raise ValueError("end-to-end reconstruction stride must be ≥ 1")
        if self.top_k < 0:
            raise ValueError("end-to-end reconstruction top_k must be ≥ 0 (0: the whole vocabulary)")


@dataclass(frozen=True)
class AllocationConfig:
    """ILA-AMP: per-unit activation bits from measured costs and an integer program.

    granularity: a unit is a decoder ``block`` (TWLA) or an input ``site``; options: the bit-widths
    𝔅; budget: the mean bits over activation elements, Σ w·b ≤ budget·Σ w (w = a unit's input
    width per token); beta: interaction weight β; solver: one of ``twla.solvers.bits.SOLVERS``.
    Costs are deltas of ``metric`` (``kl`` to the reference model's next-token distribution, or
    the ``loss``) against every unit at ``reference`` bits, measured on the first ``samples``
    calibration windows cut to ``seqlen`` tokens, scoring every ``stride``-th position.
    costs: ``measured`` (one pass per unit and option, and per adjacent pair and options when β > 0)
    or ``fisher``, the second-order estimate of the unary costs from one backward pass (no pair
    terms, so β has nothing to weigh; seconds instead of minutes).
    """

    granularity: Granularity = "block"
    options: tuple[int, ...] = (2, 4, 6, 8)
    budget: float = 4.0
    beta: float = 0.5
    reference: int = 8
    metric: CostMetric = "kl"
    solver: str = "dp"
    samples: int = 2
    seqlen: int = 256
    stride: int = 4
    costs: CostSource = "measured"

    def __post_init__(self) -> None:
        check_choice("allocation granularity", self.granularity, Granularity)
        check_choice("allocation costs", self.costs, CostSource)
        check_choice("cost metric", self.metric, CostMetric)
        if self.solver not in BIT_SOLVERS:
            raise ValueError(f"unknown bit solver {self.solver!r}; choose one of {', '.join(BIT_SOLVERS)}")
        for bits in (*self.options, self.reference):
            if bits not in ACTIVATION_BITS:
                raise ValueError(f"activation bit option {bits} is not one of {ACTIVATION_BITS}")
        if not self.options or len(set(self.options)) != len(self.options):
            raise ValueError(f"options must be distinct bit-widths, got {self.options}")
        check_mean_budget(self.budget, self.options)
        if self.beta < 0 or min(self.samples, self.seqlen, self.stride) < 1 or self.seqlen <= self.stride:
            raise ValueError("beta must be ≥ 0, samples ≥ 1, stride ≥ 1 and seqlen > stride")

    @property
    def clip_bits(self) -> tuple[int, ...]:
        """The bit-widths whose clipping ratios the allocation needs."""
        return tuple(sorted({*self.options, self.reference} - {16}))


@dataclass(frozen=True)
class WeightAllocationConfig:
    """Weight mixed precision: a weight format per linear from measured costs and an integer program.

    options: formats of :data:`WEIGHT_FORMATS` (``ternary`` is the method's own weights, ``intN``
    N-bit uniform integer weights with the method's block size and compensation); budget: stored
    bits per quantized weight over all linears (codes and grids: Σ bits_ℓ ≤ budget · Σ n_ℓ); solver:
    one of :data:`WEIGHT_SOLVERS`. Costs are deltas of
    ``metric`` against the full-precision model, one linear at a time in each format, on the first
    ``samples`` calibration windows cut to ``seqlen`` tokens, scoring every ``stride``-th position.
    """

    options: tuple[str, ...] = ("ternary", "int3", "int4")
    budget: float = 2.5
    metric: CostMetric = "kl"
    solver: str = "milp"
    samples: int = 2
    seqlen: int = 256
    stride: int = 4

    def __post_init__(self) -> None:
        check_choice("cost metric", self.metric, CostMetric)
        unknown = [o for o in self.options if o not in WEIGHT_FORMATS]
        if unknown or not self.options or len(set(self.options)) != len(self.options):
            raise ValueError(
                f"weight allocation options must be distinct formats of {', '.join(WEIGHT_FORMATS)}, got {self.options}"
            )
        if self.solver not in WEIGHT_SOLVERS:
            raise ValueError(
                f"weight allocation solver {self.solver!r}: choose one that takes a stored-bits budget "
                f"({', '.join(WEIGHT_SOLVERS)})"
            )
        if not (self.budget > 0 and self.budget < float("inf")):
            raise ValueError(f"weight allocation budget must be a positive number of bits per weight: {self.budget}")
        if min(self.samples, self.seqlen, self.stride) < 1 or self.seqlen <= self.stride:
            raise ValueError("weight allocation needs samples ≥ 1, stride ≥ 1 and seqlen > stride")
