"""The parameters θ that output reconstruction tunes in quantized decoder blocks
(:mod:`twla.quantization.reconstruct`): each linear's grid (α, μ, or a uniform scale), its
codes under learned rounding, its activation clipping ratio, and the RMSNorm gains, each a
:class:`~twla.solvers.reconstruct.Scaled` step around its start.

Learned rounding gives every ternary weight an offset V ∈ [−1, 1] on its code T₀; the block
runs with T = clamp(round(T₀ + V), −1, 1), differentiated straight through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from twla.models.adapters import Adapter
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.sections import ReconstructionConfig
from twla.quantization.weights import QuantizedWeight
from twla.solvers.reconstruct import Scaled

MIN_CLIP = 0.1  # the learned clipping ratio stays in [MIN_CLIP, 1]


def ternary_codes(z: Tensor) -> Tensor:
    """clamp(round(z), −1, 1): the codes that learned offsets z = T₀ + V stand for."""
    return z.round().clamp(-1, 1)


def products_in(dtype: torch.dtype, device_type: str) -> torch.autocast:
    """The context that runs matrix products in ``dtype`` (autocast; float32: as they are)."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def weight_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The type a tuned weight is built in: inside autocast (a solve with reduced-precision
    products) the type its product casts it to anyway, so it is built once in that type with no
    mixed-type arithmetic; otherwise the module's own ``dtype``."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def straight_through_codes(z: Tensor) -> Tensor:
    """:func:`ternary_codes` in the forward pass, the identity in the backward pass."""
    return z + (ternary_codes(z) - z).detach()


@dataclass
class Tunables:
    """The parameters θ of some quantized blocks, addressed by module path under a root module
    (a decoder block, or the whole model): grids, learned codes T₀ + V and clipping ratios by
    linear path, RMSNorm gains by parameter path; ``weights`` are the quantized weights the grids
    and codes belong to, by linear path. θ holds no module (a streamed block's modules come and
    go with their weights)."""

    grids: dict[str, dict[str, Scaled]]
    codes: dict[str, Scaled]
    norms: dict[str, Scaled]
    clips: dict[str, Scaled]
    weights: dict[str, QuantizedWeight]

    @classmethod
    def gather(
        cls,
        root: nn.Module,
        blocks: dict[str, int],
        adapter: Adapter,
        weights: Mapping[str, QuantizedWeight],
        config: ReconstructionConfig,
    ) -> Tunables:
        """θ of the blocks {path prefix under ``root`` (``""`` or ``"model.layers.3."``): index};
        ``weights`` by full linear name."""
        device = next(root.parameters()).device
        grids, codes, norms, clips, found = {}, {}, {}, {}, {}
        code_step = torch.tensor(config.code_lr / config.lr, device=device)  # Adam moves δ by about lr
        for prefix, index in blocks.items():
            for path in adapter.linear_names():
                module = root.get_submodule(prefix + path)
                if config.grid or config.codes:
                    weight = found[prefix + path] = weights[f"{adapter.layers}.{index}.{path}"]
                if config.grid:
                    units = weight.grid_magnitudes()  # e.g. μ moves in units of |α|
                    grids[prefix + path] = {
                        k: Scaled(v.to(device), units[k].to(device)) for k, v in weight.grid().items()
                    }
                if config.codes:
                    codes[prefix + path] = Scaled(weight.codes.to(device, torch.float32), code_step)
                if config.clips and isinstance(module, QuantLinear) and module.act.quantized:
                    start = torch.tensor(float(module.act.clip), device=device)
                    clips[prefix + path] = Scaled(start, start.clone())
            for site in adapter.sites if config.norms else ():
                if site.norm:
                    gain = root.get_submodule(prefix + site.norm).weight.detach()
                    scale = (gain + adapter.norm_offset).abs()  # the norm scales by offset + w
                    norms[f"{prefix}{site.norm}.weight"] = Scaled(gain.clone(), scale)
        return cls(grids, codes, norms, clips, found)

    def params(self) -> list[Scaled]:
        grids = [s for grid in self.grids.values() for s in grid.values()]
        return grids + [*self.codes.values(), *self.norms.values(), *self.clips.values()]

    def _grid(self, path: str) -> dict[str, Tensor]:
        """The quantized weight ``path``'s grid and codes under θ (its stored ones where θ has none)."""
        if path in self.grids:
            values = {k: s.value() for k, s in self.grids[path].items()}
        else:
            values = {k: v.to(self.codes[path].base) for k, v in self.weights[path].grid().items()}
        if path in self.codes:
            values["codes"] = straight_through_codes(self.codes[path].value())
        return values

    def _weight_paths(self) -> list[str]:
        """The linears whose weights θ changes (grid or codes), in a fixed order."""
        return list(dict.fromkeys([*self.grids, *self.codes]))

    def overrides(self, root: nn.Module) -> dict[str, Tensor]:
        """The parameter values of θ for :func:`functional_call` on ``root`` (clipping ratios are set
        on their modules directly)."""
        values = {name: s.value() for name, s in self.norms.items()}
        for path in self._weight_paths():
            weight = root.get_submodule(path).weight
            dtype = weight_dtype(weight.dtype, weight.device.type)
            values[f"{path}.weight"] = self.weights[path].with_grid(**self._grid(path)).to(dtype)
        for path, s in self.clips.items():
            module = root.get_submodule(path)
            module.act = replace(module.act, clip=s.value())
        return values

    def project(self) -> None:
        for s in self.clips.values():
            s.delta.clamp_((MIN_CLIP - s.base) / s.scale, (1 - s.base) / s.scale)
        for s in self.codes.values():  # V = scale·δ ∈ [−1, 1]
            s.delta.clamp_(-1 / s.scale, 1 / s.scale)

    @torch.no_grad()
    def write_back(self, root: nn.Module) -> None:
        """Store θ: codes and grids into the quantized weights and the modules' dequantized
        weights, gains into the norms, clipping ratios into the modules' per-bit-width ratios."""
        for path in self._weight_paths():
            weight = self.weights[path]
            if path in self.codes:
                weight.codes = ternary_codes(self.codes[path].value()).to("cpu", torch.int8)
            if path in self.grids:
                weight.set_grid(**{k: s.value() for k, s in self.grids[path].items()})
            linear = root.get_submodule(path)
            linear.weight.copy_(weight.dequantize(linear.weight.dtype).to(linear.weight.device))
        for name, s in self.norms.items():
            root.get_submodule(name.removesuffix(".weight")).weight.copy_(s.value())
        for path, s in self.clips.items():
            module = root.get_submodule(path)
            module.act_clips[module.act.bits] = float(s.value())
            module.set_act_bits(module.act.bits)
