"""Configuration objects: how weights and activations are quantized, how inputs are rotated.

A method is named by a spec string: a base weight quantizer, then modifiers joined by ``+``.

- base: ``absmean``, ``twn``, ``pt2`` (PT²-LLM ATQ: ITF + AGA), ``e2m`` (E2M-ATQ: ITF with
  TWLA's rule + exact S-metric refit), or ``rtn2`` / ``rtn3`` / ``rtn4`` / ``rtn8`` (uniform
  integer weights, familiar references);
- weights: ``gptq`` (error compensation), ``ssr`` (Structural Similarity Reordering), ``g64``
  (grids per 64 input columns instead of 128: more side bits, a finer fit);
- rotations: ``had`` (fixed random Kronecker-Hadamard), ``rand`` (fixed random orthogonal),
  ``kotms`` (learned on the Stiefel manifold; ``act`` adds the activation term to its
  loss), ``reloc`` (E2M stage-2 Stiefel relocation per site), ``r1`` (offline
  residual-stream rotation with RMSNorm folding);
- activations: ``a2``/``a3``/``a4``/``a6``/``a8`` (per-token bits), ``sym`` (symmetric);
- mixed activation bits (ILA-AMP): ``amp`` (one bit-width per decoder block, TWLA) or
  ``amp-site`` (per input site), options {2, 4, 6, 8}, mean budget 4, β = 0.5;
- ``recon``: block-wise output reconstruction of each quantized decoder block.

E.g. ``e2m+gptq+ssr`` (W1.58A16), ``e2m+gptq+ssr+kotms+reloc+a4`` (W1.58A4),
``e2m+gptq+ssr+had+amp`` (W1.58, mixed A2–A8 averaging ≤ 4 bits), ``rtn4+had+a4``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

from twla.kernels.uniform import ACTIVATION_BITS
from twla.solvers.bits import SOLVERS as BIT_SOLVERS
from twla.solvers.bits.problem import check_mean_budget
from twla.solvers.stiefel import STIEFEL_SOLVERS, StiefelSolver
from twla.solvers.ternary import ItfRule

Quantizer = Literal["absmean", "twn", "atq"]


@dataclass(frozen=True)
class TernaryConfig:
    """Ternarization of every linear weight in blocks of ``block_size`` input columns.

    quantizer: stage 1 fit per (row, block): ``absmean``, ``twn`` or ``atq`` (ITF).
    itf_rule / itf_iters: ITF code-update rule (``lsq`` PT²-LLM, ``twn`` TWLA) and iterations.
    refit: stage 2, the exact refit of (α, μ) in the layer-input metric (AGA / E2M).
    compensate: GPTQ error compensation; reorder: SSR block order; damp: λ of H = S + λ·mean(diag S)·I.
    """

    quantizer: Quantizer = "atq"
    itf_rule: ItfRule = "lsq"
    itf_iters: int = 10
    refit: bool = True
    block_size: int = 128
    compensate: bool = True
    reorder: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.quantizer not in ("absmean", "twn", "atq"):
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose absmean, twn or atq")
        if self.itf_rule not in ("lsq", "twn"):
            raise ValueError(f"unknown ITF rule {self.itf_rule!r}; choose lsq or twn")
        if self.block_size < 1 or self.itf_iters < 0 or self.damp < 0:
            raise ValueError("block_size must be ≥ 1, itf_iters ≥ 0 and damp ≥ 0")

    @property
    def has_offset(self) -> bool:
        """Whether the grid stores a per-(row, block) offset μ besides the scale α."""
        return self.quantizer == "atq" or self.refit


@dataclass(frozen=True)
class UniformConfig:
    """Uniform integer weights: per (row, group of ``block_size`` columns) min-max grid with a
    16-bit scale and a ``bits``-bit zero point; round to nearest, or GPTQ with ``compensate``."""

    bits: int = 4
    block_size: int = 128
    compensate: bool = False
    reorder: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 6, 8):
            raise ValueError(f"uniform weights support 2, 3, 4, 6 or 8 bits, got {self.bits}")
        if self.block_size < 1 or self.damp < 0:
            raise ValueError("block_size must be ≥ 1 and damp ≥ 0")


WeightConfig = TernaryConfig | UniformConfig
SiteRotation = Literal["none", "hadamard", "random", "kotms"]
ResidualRotation = Literal["none", "hadamard", "random"]


@dataclass(frozen=True)
class RotationConfig:
    """Orthogonal rotations of the linear layers' inputs.

    site: one online Kronecker rotation R = R₁ ⊗ R₂ per input site (q/k/v, o, gate/up, down),
    ``hadamard`` / ``random`` fixed, ``kotms`` learned (tri-modal loss) starting from
    ``init``; the weight side is fused offline (W ← W R).
    relocate: E2M stage-2 relocation of each site's factors against its ternarized output
    error, starting from the site rotation (identity when ``site="none"``).
    residual: offline residual-stream rotation with RMSNorm folding (QuaRot's R1).
    solver / steps / lr / balance / rows: the KOTMS problem (rows: weight rows per site
    used by the loss, evenly spaced); activation_weight γ > 0 adds γ times the expected
    relative 4-bit quantization noise of X R on ``activation_tokens`` full-precision
    calibration inputs per site (modifier ``act``, γ = 10); relocate_*: the relocation problem.
    factors: optional {dimension: (m₁, m₂)} overrides of the Kronecker factor sizes.
    """

    site: SiteRotation = "none"
    relocate: bool = False
    residual: ResidualRotation = "none"
    init: Literal["identity", "random", "hadamard"] = "hadamard"
    solver: StiefelSolver = "riemannian-adam"
    steps: int = 100
    lr: float = 5e-2
    balance: float = 0.1
    rows: int = 128
    activation_weight: float = 0.0
    activation_tokens: int = 256
    relocate_solver: StiefelSolver = "riemannian-adam"
    relocate_steps: int = 20
    relocate_lr: float = 5e-3
    factors: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "site": (self.site, ("none", "hadamard", "random", "kotms")),
            "residual": (self.residual, ("none", "hadamard", "random")),
            "init": (self.init, ("identity", "random", "hadamard")),
            "solver": (self.solver, STIEFEL_SOLVERS),
            "relocate_solver": (self.relocate_solver, STIEFEL_SOLVERS),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"unknown rotation {name} {value!r}; choose one of {', '.join(allowed)}")
        if min(self.steps, self.relocate_steps) < 0 or min(self.lr, self.relocate_lr) <= 0 or self.rows < 1:
            raise ValueError("rotation steps must be ≥ 0, learning rates > 0 and rows ≥ 1")
        if self.activation_weight < 0 or self.activation_tokens < 1:
            raise ValueError("activation_weight must be ≥ 0 and activation_tokens ≥ 1")

    @property
    def online(self) -> bool:
        """Whether the linear layers get online input rotations."""
        return self.site != "none" or self.relocate


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
                f"block reconstruction holds out {self.holdout} of the {windows} calibration windows and "
                f"needs at least one more to train on; use more calibration windows or a smaller holdout"
            )


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

    granularity: Literal["block", "site"] = "block"
    options: tuple[int, ...] = (2, 4, 6, 8)
    budget: float = 4.0
    beta: float = 0.5
    reference: int = 8
    metric: Literal["kl", "loss"] = "kl"
    solver: str = "dp"
    samples: int = 2
    seqlen: int = 256
    stride: int = 4

    def __post_init__(self) -> None:
        if self.granularity not in ("block", "site"):
            raise ValueError(f"unknown allocation granularity {self.granularity!r}; choose block or site")
        if self.metric not in ("kl", "loss"):
            raise ValueError(f"unknown cost metric {self.metric!r}; choose kl or loss")
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


BASE_METHODS: dict[str, WeightConfig] = {
    "absmean": TernaryConfig(quantizer="absmean", refit=False, compensate=False),
    "twn": TernaryConfig(quantizer="twn", refit=False, compensate=False),
    "pt2": TernaryConfig(quantizer="atq", itf_rule="lsq", itf_iters=10, refit=True, compensate=False),
    "e2m": TernaryConfig(quantizer="atq", itf_rule="twn", itf_iters=15, refit=True, compensate=False),
    **{f"rtn{b}": UniformConfig(bits=b) for b in (2, 3, 4, 8)},
}
WEIGHT_MODIFIERS = {"gptq": {"compensate": True}, "ssr": {"reorder": True}, "g64": {"block_size": 64}}
ROTATION_MODIFIERS = {
    "had": {"site": "hadamard"},
    "rand": {"site": "random"},
    "kotms": {"site": "kotms"},
    "act": {"site": "kotms", "activation_weight": 10.0},
    "reloc": {"relocate": True},
    "r1": {"residual": "hadamard"},
}
ACTIVATION_MODIFIERS = {f"a{b}": {"bits": b} for b in ACTIVATION_BITS if b < 16} | {"sym": {"symmetric": True}}
ALLOCATION_MODIFIERS = {"amp": {"granularity": "block"}, "amp-site": {"granularity": "site"}}
RECONSTRUCTION_MODIFIERS = {"recon": {}}
MODIFIERS = {
    **WEIGHT_MODIFIERS,
    **ROTATION_MODIFIERS,
    **ACTIVATION_MODIFIERS,
    **ALLOCATION_MODIFIERS,
    **RECONSTRUCTION_MODIFIERS,
}


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
    widths = [m for m in mods if m in ACTIVATION_MODIFIERS and m != "sym"]
    if len(widths) > 1:
        raise ValueError(f"{spec!r} names several activation bit-widths ({', '.join(widths)}); choose one")
    if "sym" in mods and not widths and not any(m in ALLOCATION_MODIFIERS for m in mods):
        raise ValueError(f"{spec!r}: sym has no effect without quantized activations (+a2 … +a8, or +amp)")
    sites = sorted({"kotms" if m == "act" else m for m in mods if m in ("had", "rand", "kotms", "act")})
    if len(sites) > 1:
        raise ValueError(f"{spec!r} names several site rotations ({', '.join(sites)}); choose one")
    if len({m for m in mods if m in ALLOCATION_MODIFIERS}) > 1:
        raise ValueError(f"{spec!r} names both amp and amp-site; choose one granularity")
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
    return replace(BASE_METHODS[base], **_flags(mods, WEIGHT_MODIFIERS), **overrides)


@dataclass(frozen=True)
class QuantConfig:
    """The whole post-training quantization run.

    allocation: ILA-AMP mixed activation bits, chosen after the layers are quantized (the
    layer-wise pass itself runs with ``activations.bits``).
    reconstruction: block-wise output reconstruction of each decoder block once its linears
    are quantized (``recon``).
    true_sequential: quantize the input sites of a decoder layer one after another,
    each seeing the outputs of the already-quantized ones (GPTQ's true-sequential).
    batch_size: calibration sequences per forward pass.
    """

    weights: WeightConfig = field(default_factory=TernaryConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    allocation: AllocationConfig | None = None
    reconstruction: ReconstructionConfig | None = None
    true_sequential: bool = True
    batch_size: int = 8

    @classmethod
    def from_method(
        cls,
        spec: str,
        amp: Mapping[str, object] | None = None,
        weights: Mapping[str, object] | None = None,
        **kwargs: object,
    ) -> QuantConfig:
        """Parse a method spec (module docstring) into a full configuration; ``amp`` overrides
        fields of the :class:`AllocationConfig` of an ``amp``/``amp-site`` spec (e.g. budget, beta),
        ``weights`` fields of the weight quantizer's config (e.g. damp)."""
        _, mods = _parse(spec)
        acts = _flags(mods, ACTIVATION_MODIFIERS)
        allocation = None
        if any(m in ALLOCATION_MODIFIERS for m in mods):
            allocation = AllocationConfig(**{**_flags(mods, ALLOCATION_MODIFIERS), **(amp or {})})
            # the layer-wise pass runs at the budget's bits (rounded down to a supported width)
            acts.setdefault("bits", max(b for b in ACTIVATION_BITS if b <= max(allocation.budget, 2)))
        return cls(
            weights=method_config(spec, **(weights or {})),
            rotation=RotationConfig(**_flags(mods, ROTATION_MODIFIERS)),
            activations=ActivationConfig(**acts),
            allocation=allocation,
            reconstruction=ReconstructionConfig() if "recon" in mods else None,
            **kwargs,
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict of the whole configuration, with its format version and the kind of
        weights; :meth:`from_dict` rebuilds the identical configuration from it."""
        data = asdict(self)
        data["weights"]["kind"] = "ternary" if isinstance(self.weights, TernaryConfig) else "uniform"
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping) -> QuantConfig:
        """The configuration written by :meth:`to_dict` (e.g. a checkpoint's ``config``); a dict
        of another version, or with unknown or missing fields, is refused with a message."""
        data = dict(data)
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"configuration format version {version!r} is not {CONFIG_VERSION}, the one this twla reads"
            )
        weights = dict(_section(data, "weights"))
        kind = weights.pop("kind", None)
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"configuration weights: kind {kind!r} is not one of {', '.join(WEIGHT_KINDS)}")
        rotation = dict(_section(data, "rotation"))
        rotation["factors"] = {int(dim): tuple(f) for dim, f in rotation.get("factors", {}).items()}
        activations = dict(_section(data, "activations"))
        activations["clip_grid"] = tuple(activations.get("clip_grid", ActivationConfig.clip_grid))
        allocation = _section(data, "allocation", optional=True)
        if allocation is not None:
            allocation = {**allocation, "options": tuple(allocation.get("options", AllocationConfig.options))}
        reconstruction = _section(data, "reconstruction", optional=True)
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
            **data,
        )

    def with_seed(self, seed: int) -> QuantConfig:
        """The same configuration with every random choice (rotations, reconstruction batches) seeded by ``seed``."""
        recon = self.reconstruction and replace(self.reconstruction, seed=seed)
        return replace(self, rotation=replace(self.rotation, seed=seed), reconstruction=recon)


CONFIG_VERSION = 1
WEIGHT_KINDS: dict[str, type] = {"ternary": TernaryConfig, "uniform": UniformConfig}


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
