"""twla as a transformers quantization method: ``from_pretrained`` and ``save_pretrained`` of
packed checkpoints.

``import twla`` registers :class:`TwlaConfig` and :class:`TwlaHfQuantizer` under the
quant_method ``twla`` (:func:`register`, run as soon as transformers' quantizers are imported), so
that::

    import twla
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/w158a4", device_map="cuda", dtype=torch.float16)

builds the model on the meta device, puts empty packed linears (:mod:`twla.deploy.linears`) in
place of the dense ones (no dense weight is ever allocated), reads the packed
tensors into them, and gives a model that ``generate``, ``pipeline`` and ``save_pretrained``
use as any other. The checkpoint logic lives in :mod:`twla.deploy.load` and
:mod:`twla.deploy.save`; this module only connects it to transformers' quantizer hooks.

twla quantizes with calibration data (``twla quantize``), never inside ``from_pretrained``:
passing a :class:`TwlaConfig` to load a dense model is refused.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from twla.deploy.format import QUANT_METHOD


class TwlaConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a packed checkpoint (written by
    :func:`twla.deploy.save.quantization_config`): format and version, the method that
    produced it, each packed linear's settings, and which linear holds the rotation factors
    that others of its site share."""

    def __init__(
        self,
        format: str = "",
        version: int = 0,
        method: str = "",
        linears: dict[str, dict] | None = None,
        rotation_sources: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"a TwlaConfig has quant_method {QUANT_METHOD!r}")
        if kwargs:
            raise ValueError(f"unknown twla quantization_config fields: {', '.join(sorted(kwargs))}")
        self.quant_method = QUANT_METHOD
        self.format, self.version, self.method = format, version, method
        self.linears = dict(linears or {})
        self.rotation_sources = dict(rotation_sources or {})


class TwlaHfQuantizer(HfQuantizer):
    """Loads and saves packed ternary checkpoints through transformers (pre-quantized only)."""

    requires_calibration = True

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else set()
        if devices & {"disk"} or len(devices) > 1:
            raise ValueError(
                "a packed twla model loads onto one device; give device_map a single device (e.g. 'cuda' or 'cpu')"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        from twla.deploy.load import prepare_packed_model

        if not checkpoint_files:
            raise ValueError(
                "a packed twla model loads from its checkpoint files (a state_dict alone is not supported)"
            )
        prepare_packed_model(model, self.quantization_config.to_dict(), list(checkpoint_files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from twla.deploy.cpu_layout import to_cpu_layout
        from twla.deploy.load import finish_packed_model

        finish_packed_model(model, self.quantization_config.to_dict())
        to_cpu_layout(model)
        return model

    def get_state_dict_and_metadata(self, model):
        from twla.deploy.save import packed_state_dict

        return packed_state_dict(model), {"format": "pt"}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the packed format with transformers, once per process."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(TwlaConfig)
        register_quantizer(QUANT_METHOD)(TwlaHfQuantizer)
