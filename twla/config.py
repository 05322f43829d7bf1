"""Configuration objects: how weights and activations are quantized, how inputs are rotated.

A method is named by a spec string: a base weight quantizer, then modifiers joined by ``+``.
The vocabulary is one table, :data:`VOCABULARY` (name, group, what it sets, help): the
parser, ``twla bench --help`` and the README's method table all come from it.

E.g. ``e2m+gptq+ssr`` (W1.58A16), ``e2m+gptq+ssr+kotms+reloc+a4`` (W1.58A4),
``e2m+gptq+ssr+had+amp`` (W1.58, mixed A2–A8 averaging ≤ 4 bits), ``rtn4+had+a4``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar, Literal, get_args

from twla.kernels.uniform import ACTIVATION_BITS
from twla.solvers.bits import SOLVERS as BIT_SOLVERS
from twla.solvers.bits.problem import check_mean_budget
from twla.solvers.stiefel import StiefelSolver
from twla.solvers.ternary import ItfRule

Quantizer = Literal["absmean", "twn", "atq"]
Granularity = Literal["block", "site"]
CostMetric = Literal["kl", "loss"]


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
        """Whether the packed checkpoint format and the kernels hold these weights (plain ternary)."""
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
    packable: ClassVar[bool] = False  # a reference: fake-quantized only

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


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block-wise output reconstruction after each decoder block is quantized (codes frozen).

    Tunes the block's ``grid`` (α, μ per (row, block), or uniform scales), its ``norms``
    (RMSNorm gains) and its activation ``clips`` (straight-through) to minimize the block's
    output error against the full-precision block on the same inputs (from the quantized
    prefix): Adam, ``steps`` steps of ``batch`` windows, learning rate ``lr`` on steps
    relative to each parameter's magnitude, early stopping on the last ``holdout``
    calibration windows (checked every ``eval_every`` steps, ``patience`` checks).
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
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or min(self.batch, self.eval_every, self.patience) < 1 or self.holdout < 0:
            raise ValueError("reconstruction needs steps ≥ 0, lr > 0, batch, eval_every, patience ≥ 1, holdout ≥ 0")
        if not (self.grid or self.norms or self.clips):
            raise ValueError("reconstruction has nothing to tune: enable grid, norms or clips")

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

    on every ``stride``-th position of the calibration windows (the full-precision
    log-probabilities are computed before quantization and kept in float16). The whole model
    sits on the device during the solve.
    """

    lr: float = 2e-3
    stride: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride < 1:
            raise ValueError("end-to-end reconstruction stride must be ≥ 1")


@dataclass(frozen=True)
class AllocationConfig:
    """ILA-AMP: per-unit activation bits from measured costs and an integer program.

    granularity: a unit is a decoder ``block`` (TWLA) or an input ``site``; options: the bit-widths
    𝔅; budget: the mean bits over activation elements, Σ w·b ≤ budget·Σ w (w = a unit's input
    width per token); beta: interaction weight β; solver: one of ``twla.solvers.bits.SOLVERS``.
    Costs are deltas of ``metric`` (``kl`` to the reference model's next-token distribution, or
    the ``loss``) against every unit at ``reference`` bits, measured on the first ``samples``
    calibration windows cut to ``seqlen`` tokens, scoring every ``stride``-th position.
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

    def __post_init__(self) -> None:
        check_choice("allocation granularity", self.granularity, Granularity)
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
class Term:
    """One row of the method vocabulary: its names, its group, what each name sets, its help.

    A base (group ``base``) sets the whole weight quantizer; a modifier sets fields of the
    section of :class:`QuantConfig` its group names (a ``reconstruction`` modifier sets a
    reconstruction field of :class:`QuantConfig` itself). Modifiers that share a ``choice`` are
    alternatives: a spec may name at most one of them.
    """

    names: tuple[str, ...]
    group: str  # base, weights, rotation, activations, allocation or reconstruction
    sets: tuple[object, ...]  # per name: a weight config (base) or the fields it sets
    help: str
    choice: str | None = None


_ATQ = dict(quantizer="atq", refit=True, compensate=False)
_ACT_WIDTHS = tuple(b for b in ACTIVATION_BITS if b < 16)
VOCABULARY: tuple[Term, ...] = (
    Term(
        ("absmean",),
        "base",
        (TernaryConfig(quantizer="absmean", refit=False, compensate=False),),
        "BitNet b1.58: s = mean\\|W\\| per (row, block), T = clamp(round(W/s))",
    ),
    Term(
        ("twn",),
        "base",
        (TernaryConfig(quantizer="twn", refit=False, compensate=False),),
        "ternary weight networks: threshold 0.75·mean\\|W\\|, least-squares scale",
    ),
    Term(
        ("pt2",),
        "base",
        (TernaryConfig(itf_rule="lsq", itf_iters=10, **_ATQ),),
        "PT²-LLM asymmetric ternary: ITF (alternating exact grid / nearest codes, 10 iterations) + AGA refit",
    ),
    Term(
        ("e2m",),
        "base",
        (TernaryConfig(itf_rule="twn", itf_iters=15, **_ATQ),),
        "E2M-ATQ: stage 1 ITF with TWLA's rule (TWN threshold + μ residual correction, 15 iterations), "
        "stage 2 exact S-metric refit",
    ),
    Term(
        tuple(f"rtn{b}" for b in (2, 3, 4, 8)),
        "base",
        tuple(UniformConfig(bits=b) for b in (2, 3, 4, 8)),
        "uniform integer weights (per (row, 128-block) min-max grid: 16-bit scale, b-bit zero point), "
        "familiar references",
    ),
    Term(
        ("gptq",),
        "weights",
        ({"compensate": True},),
        "GPTQ error compensation (blocks of 128 columns, partial last block)",
    ),
    Term(("ssr",), "weights", ({"reorder": True},), "Structural Similarity Reordering of the blocks"),
    Term(
        ("g64",),
        "weights",
        ({"block_size": 64},),
        "one grid (α, μ or scale, zero) per 64 input columns instead of 128: a finer fit for more side bits "
        "(ternary 2.5 instead of 2.25 bits per weight before the column order)",
    ),
    Term(
        ("struct", "sal"),
        "weights",
        ({"salient": 8, "groups": 2}, {"salient": 8}),
        "structured ternary (TWLA's structured mode; fake-quantized only): per 128-column block the 8 most "
        "Hessian-salient columns get a second ternary plane (9 levels), and the other weights of each row split "
        "into 2 magnitude groups with their own α, μ (1 group bit each; about 3.9 stored bits per weight), or "
        "with `sal` stay in one group (about 2.75 bits)",
        "structured ternary",
    ),
    Term(
        ("had", "rand"),
        "rotation",
        ({"site": "hadamard"}, {"site": "random"}),
        "fixed online rotation per input site: random-sign Kronecker-Hadamard, or random orthogonal",
        "site rotation",
    ),
    Term(
        ("kotms",),
        "rotation",
        ({"site": "kotms"},),
        "online rotation per input site learned by KOTMS (tri-modal loss on the Stiefel manifold, starting from "
        "the Kronecker-Hadamard rotation), kept per layer only where it lowers the site's output error with "
        "ternary weights and quantized activations on held-out calibration inputs",
        "site rotation",
    ),
    Term(
        ("act",),
        "rotation",
        ({"site": "kotms", "kotms": KotmsConfig(activation_weight=10.0)},),
        "`+kotms` with the optional activation term: γ = 10 times the expected relative 4-bit quantization noise "
        "of X R on 256 full-precision calibration inputs per site",
        "site rotation",
    ),
    Term(
        ("reloc",),
        "rotation",
        ({"relocation": RelocationConfig()},),
        "E2M-ATQ stage 2: each site's rotation refined against its ternarized output error before its weights "
        "are quantized",
    ),
    Term(
        ("r1",),
        "rotation",
        ({"residual": "hadamard"},),
        "offline residual-stream rotation (Kronecker-Hadamard) with RMSNorm folding and untied lm_head, zero "
        "run-time cost",
    ),
    Term(
        tuple(f"a{b}" for b in _ACT_WIDTHS),
        "activations",
        tuple({"bits": b} for b in _ACT_WIDTHS),
        "per-token dynamic activation quantization of every quantized linear's input (after its rotation), "
        "asymmetric min-max, clipping ratio calibrated per layer",
        "activation bits",
    ),
    Term(("sym",), "activations", ({"symmetric": True},), "symmetric activations (the integer kernel's variant)"),
    Term(
        ("amp",),
        "allocation",
        ({"granularity": "block"},),
        "ILA-AMP: activation bits per decoder block from {2, 4, 6, 8}, mean ≤ 4 bits over activation elements, "
        "β = 0.5, from costs measured on calibration tokens (the layer-wise pass runs at 4 bits, or at `+aN`)",
        "allocation granularity",
    ),
    Term(
        ("amp-site",),
        "allocation",
        ({"granularity": "site"},),
        "the same with one bit-width per input site (q/k/v, o, gate/up, down)",
        "allocation granularity",
    ),
    Term(
        ("recon",),
        "reconstruction",
        ({"reconstruction": ReconstructionConfig()},),
        "block-wise output reconstruction: once a decoder block is quantized, its α, μ (or uniform scales), "
        "RMSNorm gains and activation clipping ratios are tuned with Adam against the full-precision block's "
        "outputs, codes frozen, early stopping on 4 held-out calibration windows",
    ),
    Term(
        ("e2e",),
        "reconstruction",
        ({"end_to_end": EndToEndConfig()},),
        "end-to-end reconstruction once every block is quantized: the same parameters of all blocks at once, "
        "tuned with Adam to minimize the KL divergence from the full-precision model's next-token distribution "
        "(every 4th calibration position), early stopping on 4 held-out windows",
    ),
)


def _vocabulary(group: str) -> dict:
    return {name: value for t in VOCABULARY if t.group == group for name, value in zip(t.names, t.sets)}


BASE_METHODS: dict[str, WeightConfig] = _vocabulary("base")
WEIGHT_MODIFIERS = _vocabulary("weights")
ROTATION_MODIFIERS = _vocabulary("rotation")
ACTIVATION_MODIFIERS = _vocabulary("activations")
ALLOCATION_MODIFIERS = _vocabulary("allocation")
RECONSTRUCTION_MODIFIERS = _vocabulary("reconstruction")
MODIFIERS = {name: value for t in VOCABULARY if t.group != "base" for name, value in zip(t.names, t.sets)}
_CHOICES = {name: t.choice for t in VOCABULARY if t.choice for name in t.names}


def method_table() -> str:
    """The vocabulary as a markdown table (the README's), one row per term."""
    rows = ["| spec | meaning |", "|---|---|"]
    for t in VOCABULARY:
        prefix = "" if t.group == "base" else "+"
        rows.append(f"| {', '.join(f'`{prefix}{n}`' for n in t.names)} | {t.help} |")
    return "\n".join(rows)


def method_help() -> str:
    """The vocabulary as plain text, one line per term (the CLI's help)."""
    lines = []
    for t in VOCABULARY:
        prefix = "" if t.group == "base" else "+"
        text = f"{', '.join(prefix + n for n in t.names)}: {t.help.replace('`', '').replace(chr(92), '')}"
        lines.append(textwrap.fill(text, 100, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def _parse(spec: str) -> tuple[str, list[str]]:
    base, *mods = spec.strip().lower().split("+")
    if base not in BASE_METHODS:
        raise ValueError(f"unknown method {spec!r}: base must be one of {', '.join(BASE_METHODS)}")
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"unknown modifier {mod!r} in {spec!r}: choose from {', '.join(MODIFIERS)}")
    repeated = sorted({m for m in mods if mods.count(m) > 1})
    if repeated:
        raise ValueError(f"{spec!r} names {', '.join(repeated)} more than once")
    for choice in sorted(set(_CHOICES.values())):
        named = [m for m in mods if _CHOICES.get(m) == choice]
        if len(named) > 1:
            raise ValueError(f"{spec!r} names several choices of {choice} ({', '.join(named)}); choose one")
    quantized = any(_CHOICES.get(m) in ("activation bits", "allocation granularity") for m in mods)
    if "sym" in mods and not quantized:
        raise ValueError(f"{spec!r}: sym has no effect without quantized activations (+a2 … +a8, or +amp)")
    return base, mods


def method_parts(spec: str) -> tuple[str, frozenset[str]]:
    """A method spec's base quantizer and its set of modifiers (their order does not matter)."""
    base, mods = _parse(spec)
    return base, frozenset(mods)


def _flags(mods: list[str], table: dict[str, dict]) -> dict:
    return {k: v for mod in mods if mod in table for k, v in table[mod].items()}


def method_config(spec: str, **overrides: object) -> WeightConfig:
    """The weight quantizer of a method spec such as ``e2m+gptq+ssr``."""
    base, mods = _parse(spec)
    known = {f.name for f in fields(BASE_METHODS[base])}
    for mod in mods:
        foreign = set(WEIGHT_MODIFIERS.get(mod, {})) - known
        if foreign:
            raise ValueError(f"{spec!r}: {mod} applies to ternary weights, not to {base}")
    return replace(BASE_METHODS[base], **_flags(mods, WEIGHT_MODIFIERS), **overrides)


# The sections of a configuration that QuantConfig.from_method can override field by field.
OVERRIDABLE = ("weights", "allocation", "reconstruction", "end_to_end")


def _check_sections(names: Iterable[str]) -> None:
    unknown = [name for name in names if name not in OVERRIDABLE]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))}: not a configuration section ({', '.join(OVERRIDABLE)})")


@dataclass(frozen=True)
class QuantConfig:
    """The whole post-training quantization run.

    allocation: ILA-AMP mixed activation bits, chosen after the layers are quantized (the
    layer-wise pass itself runs with ``activations.bits``).
    reconstruction: block-wise output reconstruction of each decoder block once its linears
    are quantized (``recon``); end_to_end: the KL reconstruction of all blocks at once, after
    the last block (``e2e``).
    true_sequential: quantize the input sites of a decoder layer one after another,
    each seeing the outputs of the already-quantized ones (GPTQ's true-sequential).
    batch_size: calibration sequences per forward pass.
    """

    weights: WeightConfig = field(default_factory=TernaryConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    allocation: AllocationConfig | None = None
    reconstruction: ReconstructionConfig | None = None
    end_to_end: EndToEndConfig | None = None
    true_sequential: bool = True
    batch_size: int = 8

    @classmethod
    def from_method(cls, spec: str, overrides: Mapping[str, Mapping] | None = None, **kwargs: object) -> QuantConfig:
        """Parse a method spec (module docstring) into a full configuration.

        ``overrides`` maps a section of :data:`OVERRIDABLE` to fields that replace the spec's
        values, e.g. ``{"weights": {"damp": 0.05}, "end_to_end": {"steps": 100}}``; a section the
        spec does not turn on (``allocation`` without ``amp``, ``end_to_end`` without ``e2e``) is
        refused, so an override never goes silently unused.
        """
        _, mods = _parse(spec)
        overrides = dict(overrides or {})
        _check_sections(overrides)
        acts = _flags(mods, ACTIVATION_MODIFIERS)
        allocation = None
        if any(m in ALLOCATION_MODIFIERS for m in mods):
            allocation = AllocationConfig(**{**_flags(mods, ALLOCATION_MODIFIERS), **overrides.pop("allocation", {})})
            # the layer-wise pass runs at the budget's bits (rounded down to a supported width)
            acts.setdefault("bits", max(b for b in ACTIVATION_BITS if b <= max(allocation.budget, 2)))
        sections = _flags(mods, RECONSTRUCTION_MODIFIERS)
        for name in ("reconstruction", "end_to_end"):
            if name in overrides and name in sections:
                sections[name] = replace(sections[name], **overrides.pop(name))
        absent = sorted(set(overrides) - {"weights"})
        if absent:
            raise ValueError(f"{spec}: overrides of {', '.join(absent)}, which this method does not use")
        return cls(
            weights=method_config(spec, **overrides.get("weights", {})),
            rotation=RotationConfig(**_flags(mods, ROTATION_MODIFIERS)),
            activations=ActivationConfig(**acts),
            allocation=allocation,
            **sections,
            **kwargs,
        )

    def uses(self, section: str) -> bool:
        """Whether this configuration has ``section`` (one of :data:`OVERRIDABLE`; weights always)."""
        _check_sections([section])
        return section == "weights" or getattr(self, section) is not None

    def to_dict(self) -> dict:
        """A JSON-ready dict of the whole configuration, with its format version and the kind of
        weights; :meth:`from_dict` rebuilds the identical configuration from it."""
        data = asdict(self)
        data["weights"]["kind"] = self.weights.kind
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping) -> QuantConfig:
        """The configuration written by :meth:`to_dict` (e.g. a checkpoint's ``config``); a dict
        of another version, or with unknown or missing fields, is refused with a message."""
        data = dict(data)
        version = data.pop("version", None)
        if version not in _UPGRADES and version != CONFIG_VERSION:
            raise ValueError(
                f"configuration format version {version!r} is not one of 1 to {CONFIG_VERSION} (the ones twla reads)"
            )
        for step in range(version, CONFIG_VERSION):
            data = _UPGRADES[step](data)
        weights = dict(_section(data, "weights"))
        kind = weights.pop("kind", None)
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"configuration weights: kind {kind!r} is not one of {', '.join(WEIGHT_KINDS)}")
        rotation = dict(_section(data, "rotation"))
        rotation["factors"] = {int(dim): tuple(f) for dim, f in rotation.get("factors", {}).items()}
        rotation["kotms"] = _build(KotmsConfig, _section(rotation, "kotms"), "rotation.kotms")
        relocation = _section(rotation, "relocation", optional=True)
        if relocation is not None:
            relocation = _build(RelocationConfig, relocation, "rotation.relocation")
        rotation["relocation"] = relocation
        activations = dict(_section(data, "activations"))
        activations["clip_grid"] = tuple(activations.get("clip_grid", ActivationConfig.clip_grid))
        allocation = _section(data, "allocation", optional=True)
        if allocation is not None:
            allocation = {**allocation, "options": tuple(allocation.get("options", AllocationConfig.options))}
        reconstruction = _section(data, "reconstruction", optional=True)
        end_to_end = _section(data, "end_to_end", optional=True)
        unknown = sorted(set(data) - {"true_sequential", "batch_size"})
        if unknown:
            raise ValueError(f"configuration: unknown fields {', '.join(unknown)}")
        return cls(
            weights=_build(WEIGHT_KINDS[kind], weights, "weights"),
            rotation=_build(RotationConfig, rotation, "rotation"),
            activations=_build(ActivationConfig, activations, "activations"),
            allocation=None if allocation is None else _build(AllocationConfig, allocation, "allocation"),
            reconstruction=None
            if reconstruction is None
            else _build(ReconstructionConfig, reconstruction, "reconstruction"),
            end_to_end=None if end_to_end is None else _build(EndToEndConfig, end_to_end, "end_to_end"),
            **data,
        )

    def check_packable(self, method: str) -> None:
        """Refuse to pack weights that the packed checkpoint format does not hold."""
        if not self.weights.packable:
            raise ValueError(
                f"{method} quantizes weights to {self.weights.format}; "
                "the packed checkpoint format stores plain ternary weights"
            )

    def check_windows(self, windows: int) -> None:
        """Refuse a calibration set too small for the reconstructions' held-out windows."""
        for recon in (self.reconstruction, self.end_to_end):
            if recon:
                recon.check_windows(windows)

    def with_seed(self, seed: int) -> QuantConfig:
        """The same configuration with every random choice (rotations, reconstruction batches) seeded by ``seed``."""
        recon = self.reconstruction and replace(self.reconstruction, seed=seed)
        e2e = self.end_to_end and replace(self.end_to_end, seed=seed)
        return replace(self, rotation=replace(self.rotation, seed=seed), reconstruction=recon, end_to_end=e2e)


# 2: the KOTMS and relocation problems nested in the rotation section; end_to_end.
# 3: KOTMS keeps a learned rotation only where it measures better (kotms.gate).
# 4: ternary weights may be structured (weights.salient, weights.groups).
CONFIG_VERSION = 4


def _upgrade_v1(data: dict) -> dict:
    """A version-1 configuration (flat rotation fields) in the version-2 layout."""
    rotation = dict(data.get("rotation") or {})
    kotms = {key: rotation.pop(key) for key in [f.name for f in fields(KotmsConfig)] if key in rotation}
    relocation = {
        key: rotation.pop(f"relocate_{key}") for key in ("solver", "steps", "lr") if f"relocate_{key}" in rotation
    }
    rotation["kotms"] = kotms
    rotation["relocation"] = relocation if rotation.pop("relocate", False) else None
    return {**data, "rotation": rotation}


def _upgrade_v2(data: dict) -> dict:
    """A version-2 configuration in the version-3 layout: its learned rotations were never gated."""
    rotation = dict(data.get("rotation") or {})
    rotation["kotms"] = {"gate": False, **(rotation.get("kotms") or {})}
    return {**data, "rotation": rotation}


def _upgrade_v3(data: dict) -> dict:
    """A version-3 configuration in the version-4 layout: its ternary weights were plain
    (salient = 0, groups = 1, the defaults), so nothing changes."""
    return data


_UPGRADES = {1: _upgrade_v1, 2: _upgrade_v2, 3: _upgrade_v3}  # version → the next version's layout
WEIGHT_KINDS: dict[str, type] = {cls.kind: cls for cls in (TernaryConfig, UniformConfig)}


def _section(data: dict, name: str, optional: bool = False) -> Mapping | None:
    value = data.pop(name, None)
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"configuration {name}: expected a mapping, got {value!r}")
    return value


def _build(cls: type, values: Mapping, name: str):
    """``cls(**values)`` after checking that every key is one of its fields."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"configuration {name}: unknown fields {', '.join(unknown)}")
    return cls(**values)
