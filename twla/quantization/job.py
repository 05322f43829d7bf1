"""What every quantization run reads: the model, its calibration text and windows, and the
method settings that replace a method's own (:class:`JobConfig`, the base of the bench's and
``twla quantize``'s configurations, and the one place their defaults live)."""

from __future__ import annotations

from dataclasses import dataclass, field

from twla.models.builtin import DEFAULT_MODEL
from twla.quantization.sections import LAYER_WINDOWS


@dataclass
class JobConfig:
    """model: a built-in model, checkpoint directory or hub id; calibration: the text's name
    (:func:`twla.data.text.load_text`), cut into ``nsamples`` random windows of ``seqlen`` tokens,
    of which the layer-wise pass uses the first ``layer_windows`` (``None``: all) and end-to-end
    reconstruction all (it is short of data, the layer-wise solves are not);
    overrides: fields replacing the methods' own, by section (``QuantConfig.from_method``), e.g.
    ``{"weights": {"damp": 0.05}, "end_to_end": {"steps": 100}}``; overwrite: replace an output
    that twla wrote earlier."""

    model: str = DEFAULT_MODEL
    calibration: str = "emma+mansfieldpark"
    nsamples: int = 256
    seqlen: int = 512
    layer_windows: int | None = LAYER_WINDOWS
    device: str | None = None
    batch_size: int = 8
    overrides: dict = field(default_factory=dict)
    overwrite: bool = False
