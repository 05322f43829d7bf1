"""Method specs: a base weight quantizer, then modifiers joined by ``+``.

The vocabulary is one table, :data:`VOCABULARY` (name, group, what it sets, help): the
parser, ``twla bench --help`` and the docs' method table all come from it.

E.g. ``e2m+gptq+ssr`` (W1.58A16), ``e2m+gptq+ssr+kotms+reloc+a4`` (W1.58A4),
``e2m+gptq+ssr+had+amp`` (W1.58, mixed A2–A8 averaging ≤ 4 bits), ``rtn4+had+a4``."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, fields, replace

from twla.kernels.uniform import ACTIVATION_BITS
from twla.quantization.sections import (
    EndToEndConfig,
    KotmsConfig,
    ReconstructionConfig,
    RelocationConfig,
    TernaryConfig,
    UniformConfig,
    WeightConfig,
)


@dataclass(frozen=True)
class Term:
    """One row of the method vocabulary: its names, its group, what each name sets, its help.

    A base (group ``base``) sets the whole weight quantizer; a modifier sets fields of the
    section of :class:`QuantConfig` its group names (a ``reconstruction`` modifier sets a
    reconstruction field of :class:`QuantConfig` itself). Modifiers that share a ``choice`` are
    alternatives: a spec may name at most one of them.
    """

    names: tuple[str, ...]
    group: str  # base, weights, rotation, activations, weight allocation, allocation or reconstruction
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
        "(ternary 2.1 instead of 1.85 bits per weight before the column order)",
    ),
    Term(
        ("struct", "sal"),
        "weights",
        ({"salient": 8, "groups": 2}, {"salient": 8}),
        "structured ternary (TWLA's structured mode; fake-quantized only): per 128-column block the 8 most "
        "Hessian-salient columns get a second ternary plane (9 levels), and the other weights of each row split "
        "into 2 magnitude groups with their own α, μ (1 group bit each; about 3.5 stored bits per weight), or "
        "with `sal` stay in one group (about 2.3 bits)",
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
        ("wmix",),
        "weight allocation",
        ({},),
        "weight mixed precision: each linear ternary, 3-bit or 4-bit integer (GPTQ in its format), at most 2.5 "
        "stored bits per weight over all linears, chosen by an integer program from each linear's measured cost "
        "in each format (KL to the full-precision model on calibration tokens, one linear at a time)",
    ),
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
        ("amp-fisher",),
        "allocation",
        ({"granularity": "site", "costs": "fisher", "beta": 0.0},),
        "the same per site on the second-order (Fisher) estimate of the unary costs: one backward pass at "
        "16-bit activations instead of a pass per site and width, no pair terms (β = 0); the choice is still "
        "measured against uniform bits",
        "allocation granularity",
    ),
    Term(
        ("recon",),
        "reconstruction",
        ({"reconstruction": ReconstructionConfig()},),
        "block-wise output reconstruction: once a decoder block is quantized, its α, μ (or uniform scales), "
        "RMSNorm gains and activation clipping ratios are tuned with Adam against the full-precision block's "
        "outputs, codes frozen, early stopping on 4 held-out calibration windows",
        "block reconstruction",
    ),
    Term(
        ("round",),
        "reconstruction",
        ({"reconstruction": ReconstructionConfig(codes=True)},),
        "block-wise reconstruction (as `+recon`) with learned rounding: each ternary code may also move one "
        "level, through an offset per weight trained straight-through with the grid",
        "block reconstruction",
    ),
    Term(
        ("e2e",),
        "reconstruction",
        ({"end_to_end": EndToEndConfig()},),
        "end-to-end reconstruction once every block is quantized: the same parameters of all blocks at once, "
        "tuned with Adam to minimize the KL divergence from the full-precision model's next-token distribution "
        "(every calibration position, over the teacher's 64 most likely tokens and the rest), early stopping on "
        "4 held-out windows",
    ),
)


def _vocabulary(group: str) -> dict:
    return {name: value for t in VOCABULARY if t.group == group for name, value in zip(t.names, t.sets, strict=True)}


BASE_METHODS: dict[str, WeightConfig] = _vocabulary("base")


WEIGHT_MODIFIERS = _vocabulary("weights")


ROTATION_MODIFIERS = _vocabulary("rotation")


ACTIVATION_MODIFIERS = _vocabulary("activations")


ALLOCATION_MODIFIERS = _vocabulary("allocation")


WEIGHT_ALLOCATION_MODIFIERS = _vocabulary("weight allocation")


RECONSTRUCTION_MODIFIERS = _vocabulary("reconstruction")


MODIFIERS = {name: value for t in VOCABULARY if t.group != "base" for name, value in zip(t.names, t.sets, strict=True)}


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
