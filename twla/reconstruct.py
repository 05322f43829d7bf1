"""Block-wise output reconstruction of a quantized decoder block.

Once every linear of decoder block ℓ is quantized (codes T fixed) and its clipping ratios
calibrated, the block's continuous parameters θ — the grid of every linear (α, μ per
(row, block); uniform scales), the RMSNorm gains and the activation clipping ratios — are
tuned so that the quantized block reproduces the full-precision block on the inputs it
actually receives (the outputs of the quantized blocks before it):

    min_θ Σ_i ‖F̂_ℓ(X_i; θ) − F_ℓ(X_i)‖²_F,

solved by :func:`twla.solvers.reconstruct.reconstruct` (Adam, early stopping on held-out
calibration windows). The stored format does not change: the tuned grid is rounded to
the 16 bits it is stored in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from twla.adapters import Adapter
from twla.capture import layer_output
from twla.config import ReconstructionConfig
from twla.fake_quant import QuantLinear
from twla.solvers.reconstruct import ReconstructionResult, Scaled, reconstruct
from twla.weights import QuantizedWeight

Window = tuple[Tensor, dict]
MIN_CLIP = 0.1  # the learned clipping ratio stays in [MIN_CLIP, 1]


def _take(value, i: int, size: int):
    """Window i of a batched keyword argument (tensors with a leading batch dimension)."""
    if isinstance(value, Tensor) and size > 1 and value.ndim and value.shape[0] == size:
        return value[i : i + 1]
    if isinstance(value, tuple):
        return tuple(_take(v, i, size) for v in value)
    return value


def split_windows(batches: list[Window]) -> list[Window]:
    """One (hidden states of shape (1, T, d), keyword arguments) pair per calibration window."""
    return [
        (hidden[i : i + 1], {k: _take(v, i, hidden.shape[0]) for k, v in kwargs.items()})
        for hidden, kwargs in batches
        for i in range(hidden.shape[0])
    ]


@torch.no_grad()
def block_targets(layer: nn.Module, windows: list[Window]) -> list[Tensor]:
    """The full-precision block's output for every window (call before quantizing the block)."""
    return [layer_output(layer(hidden, **kwargs)) for hidden, kwargs in windows]


def reconstruct_block(
    layer: nn.Module,
    index: int,
    adapter: Adapter,
    windows: list[Window],
    targets: list[Tensor],
    weights: dict[str, QuantizedWeight],
    config: ReconstructionConfig,
) -> ReconstructionResult:
    """Tune block ``index``'s grids, norm gains and clipping ratios in place (module docstring);
    ``weights`` (by full linear name) receive the tuned grids."""
    device = next(layer.parameters()).device
    grids: dict[str, tuple[QuantizedWeight, dict[str, Scaled]]] = {}
    if config.grid:
        for path in adapter.linear_names():
            weight = weights[f"{adapter.layers}.{index}.{path}"]
            grid = {k: v.to(device) for k, v in weight.grid().items()}
            magnitude = next(iter(grid.values())).abs()  # α or the scale: μ moves in units of α
            grids[path] = (weight, {k: Scaled(v, magnitude) for k, v in grid.items()})
    norms = {}
    if config.norms:
        for site in adapter.sites:
            if site.norm:
                gain = layer.get_submodule(site.norm).weight.detach()
                norms[f"{site.norm}.weight"] = Scaled(gain.clone(), gain.abs().clone())
    clips: dict[QuantLinear, Scaled] = {}
    if config.clips:
        for path in adapter.linear_names():
            module = layer.get_submodule(path)
            if isinstance(module, QuantLinear) and module.act_bits < 16:
                start = torch.tensor(float(module.act_clip), device=device)
                clips[module] = Scaled(start, start.clone())

    def error(i: int) -> tuple[Tensor, Tensor]:
        hidden, kwargs = windows[i]
        overrides = {name: s.value() for name, s in norms.items()}
        for path, (weight, grid) in grids.items():
            dtype = layer.get_submodule(path).weight.dtype
            overrides[f"{path}.weight"] = weight.with_grid(**{k: s.value() for k, s in grid.items()}).to(dtype)
        for module, s in clips.items():
            module.act_clip = s.value()
        out = layer_output(functional_call(layer, overrides, (hidden,), kwargs))
        target = targets[i]
        return ((out - target) ** 2).sum(), ((target - hidden) ** 2).sum()

    def project() -> None:
        for s in clips.values():
            s.delta.clamp_((MIN_CLIP - s.base) / s.scale, (1 - s.base) / s.scale)

    params = [s for _, grid in grids.values() for s in grid.values()] + [*norms.values(), *clips.values()]
    holdout = min(config.holdout, len(windows) - 1)
    indices = list(range(len(windows)))
    flags = {p: p.requires_grad for p in layer.parameters()}
    layer.requires_grad_(False)
    try:
        with torch.enable_grad():
            result = reconstruct(
                params,
                error,
                indices[: len(indices) - holdout],
                indices[len(indices) - holdout :],
                config.steps,
                config.lr,
                config.batch,
                config.eval_every,
                config.patience,
                torch.Generator().manual_seed(config.seed * 100_003 + index),
                project,
            )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    with torch.no_grad():
        for path, (weight, grid) in grids.items():
            weight.set_grid(**{k: s.value() for k, s in grid.items()})
            linear = layer.get_submodule(path)
            linear.weight.copy_(weight.dequantize(linear.weight.dtype).to(device))
        for name, s in norms.items():
            layer.get_submodule(name.removesuffix(".weight")).weight.copy_(s.value())
        for module, s in clips.items():
            module.act_clips[module.act_bits] = float(s.value())
            module.set_act_bits(module.act_bits)
    return result
