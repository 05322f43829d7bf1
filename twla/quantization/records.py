"""What quantization reports: one record per quantized linear, and the run's report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from twla.quantization.config import QuantConfig
from twla.quantization.fake_quant import QuantLinear

if TYPE_CHECKING:
    from twla.quantization.allocation import AllocationReport
    from twla.quantization.site_rotations import RotationReport
    from twla.quantization.weight_allocation import WeightAllocationReport
    from twla.quantization.weights import QuantizedWeight


@dataclass
class LayerRecord:
    """Diagnostics of one quantized linear layer.

    weight_error = ‖W − Ŵ‖²/‖W‖², output_error = tr(E S Eᵀ)/tr(W S Wᵀ) on the calibration
    inputs; stages hold the same two ratios after each stage of the block fit (summed
    over blocks in each block's metric, relative to tr(W H Wᵀ), H the damped S).
    rotation: the site's online rotation (m₁⊗m₂) or "none"; relocation: the site's
    relocation objective (relative ternarized output error) before and after;
    act_error: relative output error ‖XWᵀ − Q_a(XR)Ŵᵀ‖²/‖XWᵀ‖² on the token sample
    without clipping and at the calibrated ratio act_clip; act_clips: the calibrated ratio of
    every bit-width a mixed-precision allocation may choose.
    """

    name: str
    layer: int
    site: str
    shape: tuple[int, int]
    weight_error: float
    output_error: float
    stages: dict[str, dict[str, float]]
    seconds: float
    rotation: str = "none"
    relocation: dict[str, float] | None = None
    act_bits: int = 16
    act_clip: float = 1.0
    act_error: dict[str, float] | None = None
    act_clips: dict[int, float] | None = None


@dataclass
class QuantReport:
    """What :func:`quantize` did: per-layer records, the quantized weights, rotations, timing."""

    config: QuantConfig
    records: list[LayerRecord] = field(default_factory=list)
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    rotation: RotationReport | None = None
    weight_allocation: WeightAllocationReport | None = None
    allocation: AllocationReport | None = None
    reconstruction: list[dict] = field(default_factory=list)  # per block: held-out error before/after, traces
    end_to_end: dict | None = None  # held-out mean KL before/after, traces
    stages: dict[str, dict] = field(default_factory=dict)  # per pipeline stage: seconds, calls, memory, its summary
    seconds: float = 0.0
    rotation_seconds: float = 0.0
    calibration_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "seconds": self.seconds,
            "rotation_seconds": self.rotation_seconds,
            "calibration_tokens": self.calibration_tokens,
            "stages": self.stages,
            "rotation": self.rotation.to_dict() if self.rotation else None,
            "weight_allocation": self.weight_allocation.to_dict() if self.weight_allocation else None,
            "allocation": self.allocation.to_dict() if self.allocation else None,
            "reconstruction": self.reconstruction,
            "end_to_end": self.end_to_end,
            "layers": [asdict(r) for r in self.records],
        }


def refresh_clips(layer: nn.Module, index: int, layers: str, *, records: list[LayerRecord]) -> None:
    """Copy the clipping ratios of decoder layer ``index`` (``layers``: the decoder layers' path),
    after reconstruction tuned them, into its records."""
    for record in records:
        if record.layer == index:
            module = layer.get_submodule(record.name.removeprefix(f"{layers}.{index}."))
            if isinstance(module, QuantLinear) and module.act_clips:
                record.act_clips = dict(module.act_clips)
                record.act_clip = module.act_clips.get(record.act_bits, 1.0)
