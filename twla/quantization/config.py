"""The whole quantization run as one configuration object, built from a method spec and
round-tripped through versioned dicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace

from twla.kernels.uniform import ACTIVATION_BITS
from twla.quantization.methods import (
    ACTIVATION_MODIFIERS,
    ALLOCATION_MODIFIERS,
    RECONSTRUCTION_MODIFIERS,
    ROTATION_MODIFIERS,
    WEIGHT_ALLOCATION_MODIFIERS,
    _flags,
    _parse,
    method_config,
)
from twla.quantization.sections import (
    LAYER_WINDOWS,
    ActivationConfig,
    AllocationConfig,
    EndToEndConfig,
    KotmsConfig,
    ReconstructionConfig,
    RelocationConfig,
    RotationConfig,
    TernaryConfig,
    UniformConfig,
    WeightAllocationConfig,
    WeightConfig,
)

# The sections of a configuration that QuantConfig.from_method can override field by field.
OVERRIDABLE = ("weights", "weight_allocation", "allocation", "reconstruction", "end_to_end")


def _check_sections(names: Iterable[str]) -> None:
    unknown = [name for name in names if name not in OVERRIDABLE]
    if unknown:
        raise ValueError(f"{', '.join(map(repr, unknown))}: not a configuration section ({', '.join(OVERRIDABLE)})")


@dataclass(frozen=True)
class QuantConfig:
    """The whole post-training quantization run.

    weight_allocation: a weight format per linear (ternary or N-bit integer) under a stored-bits
    budget, chosen before the layer-wise pass, which quantizes each linear in its format.
    allocation: ILA-AMP mixed activation bits, chosen after the layers are quantized (the
    layer-wise pass itself runs with ``activations.bits``).
    reconstruction: block-wise output reconstruction of each decoder block once its linears
    are quantized (``recon``); end_to_end: the KL reconstruction of all blocks at once, after
    the last block (``e2e``).
    true_sequential: quantize the input sites of a decoder layer one after another,
    each seeing the outputs of the already-quantized ones (GPTQ's true-sequential).
    batch_size: calibration sequences per forward pass.
    layer_windows: the layer-wise pass (GPTQ statistics, clipping, block-wise reconstruction)
    runs on the first ``layer_windows`` calibration windows (all, when there are fewer), the
    end-to-end stage and its teacher on all of them (``None``: every stage on all).
    """

    weights: WeightConfig = field(default_factory=TernaryConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    weight_allocation: WeightAllocationConfig | None = None
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    allocation: AllocationConfig | None = None
    reconstruction: ReconstructionConfig | None = None
    end_to_end: EndToEndConfig | None = None
    true_sequential: bool = True
    batch_size: int = 8
    layer_windows: int | None = LAYER_WINDOWS

    def __post_init__(self) -> None:
        if self.layer_windows is not None and self.layer_windows < 1:
            raise ValueError(f"layer_windows must be ≥ 1, got {self.layer_windows}")
        plain = isinstance(self.weights, TernaryConfig) and not self.weights.structured
        for name in ("reconstruction", "end_to_end"):
            recon = getattr(self, name)
            if recon is not None and recon.codes and not plain:
                raise ValueError(
                    f"{name} learns plain ternary codes (learned rounding); {self.weights.format} weights have none"
                )
            if recon is not None and recon.codes and self.weight_allocation is not None:
                raise ValueError(
                    f"{name} learns ternary codes (learned rounding); a weight allocation mixes in integer ones"
                )
        if self.weight_allocation is not None and not plain:
            raise ValueError(
                f"a weight allocation mixes the method's plain ternary weights with integer ones; "
                f"the method's weights are {self.weights.format}"
            )

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
        weight_allocation = None
        if any(m in WEIGHT_ALLOCATION_MODIFIERS for m in mods):
            weight_allocation = WeightAllocationConfig(
                **{**_flags(mods, WEIGHT_ALLOCATION_MODIFIERS), **overrides.pop("weight_allocation", {})}
            )
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
            weight_allocation=weight_allocation,
            activations=ActivationConfig(**acts),
            allocation=allocation,
            **sections,
            **kwargs,
        )

    @property
    def whole_model(self) -> str | None:
        """Why the layer-wise pass needs the whole model in memory, or None when it can hold one
        decoder layer at a time (``stream``)."""
        if self.weight_allocation is not None:
            return "its weight allocation (+wmix) measures every linear on the whole model"
        return None

    @property
    def streamable(self) -> bool:
        """Whether the layer-wise pass can hold one decoder layer at a time."""
        return self.whole_model is None

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
        weight_allocation = _section(data, "weight_allocation", optional=True)
        if weight_allocation is not None:
            options = tuple(weight_allocation.get("options", WeightAllocationConfig.options))
            weight_allocation = _build(
                WeightAllocationConfig, {**weight_allocation, "options": options}, "weight_allocation"
            )
        allocation = _section(data, "allocation", optional=True)
        if allocation is not None:
            allocation = {**allocation, "options": tuple(allocation.get("options", AllocationConfig.options))}
        reconstruction = _section(data, "reconstruction", optional=True)
        end_to_end = _section(data, "end_to_end", optional=True)
        unknown = sorted(set(data) - {"true_sequential", "batch_size", "layer_windows"})
        if unknown:
            raise ValueError(f"configuration: unknown fields {', '.join(unknown)}")
        return cls(
            weights=_build(WEIGHT_KINDS[kind], weights, "weights"),
            rotation=_build(RotationConfig, rotation, "rotation"),
            weight_allocation=weight_allocation,
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
                "the packed checkpoint format stores plain ternary and integer weights"
            )

    def check_windows(self, windows: int) -> None:
        """Refuse a calibration set too small for the reconstructions' held-out windows."""
        if self.reconstruction:
            self.reconstruction.check_windows(self.layer_windows_of(windows))
        if self.end_to_end:
            self.end_to_end.check_windows(windows)

    def layer_windows_of(self, windows: int) -> int:
        """How many of ``windows`` calibration windows the layer-wise pass runs on."""
        return windows if self.layer_windows is None else min(self.layer_windows, windows)

    def with_seed(self, seed: int) -> QuantConfig:
        """The same configuration with every random choice (rotations, reconstruction batches) seeded by ``seed``."""
        recon = self.reconstruction and replace(self.reconstruction, seed=seed)
        e2e = self.end_to_end and replace(self.end_to_end, seed=seed)
        return replace(self, rotation=replace(self.rotation, seed=seed), reconstruction=recon, end_to_end=e2e)


# 2: the KOTMS and relocation problems nested in the rotation section; end_to_end.
# 3: KOTMS keeps a learned rotation only where it measures better (kotms.gate).
# 4: ternary weights may be structured (weights.salient, weights.groups).
# 5: reconstruction may learn the ternary codes (reconstruction.codes, code_lr).
# 6: a weight format per linear (weight_allocation).
# 7: the layer-wise pass may run on fewer windows than the end-to-end stage (layer_windows).
# 8: the end-to-end teacher may keep only its top tokens (end_to_end.top_k).
# 9: reconstructions may multiply in bfloat16 (reconstruction.precision, end_to_end.precision).
# 10: activation allocation costs may be estimated (allocation.costs).
CONFIG_VERSION = 10


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


def _new_fields_default(data: dict) -> dict:
    """A configuration in the next layout when that layout only adds fields whose defaults
    describe what the older version did (4: plain ternary weights; 5: frozen codes; 6: one weight
    format; 10: measured activation costs)."""
    return data


def _upgrade_v6(data: dict) -> dict:
    """A version-6 configuration in the version-7 layout: every stage ran on all windows."""
    return {"layer_windows": None, **data}


def _upgrade_v7(data: dict) -> dict:
    """A version-7 configuration in the version-8 layout: its end-to-end teacher kept the whole
    vocabulary."""
    if data.get("end_to_end") is None:
        return data
    return {**data, "end_to_end": {"top_k": 0, **data["end_to_end"]}}


def _upgrade_v8(data: dict) -> dict:
    """A version-8 configuration in the version-9 layout: its reconstructions multiplied in float32."""
    sections = {
        name: {"precision": "float32", **data[name]}
        for name in ("reconstruction", "end_to_end")
        if data.get(name) is not None
    }
    return {**data, **sections}


# version → the next version's layout
_UPGRADES = {
    1: _upgrade_v1,
    2: _upgrade_v2,
    3: _new_fields_default,
    4: _new_fields_default,
    5: _new_fields_default,
    6: _upgrade_v6,
    7: _upgrade_v7,
    8: _upgrade_v8,
    9: _new_fields_default,
}


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
