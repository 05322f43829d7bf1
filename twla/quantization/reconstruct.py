"""Output reconstruction of quantized decoder blocks.

Block-wise (``recon``): once every linear of decoder block ℓ is quantized and its
clipping ratios calibrated, the block's continuous parameters θ — the grid of every linear
(α, μ per (row, block); uniform scales), the RMSNorm gains and the activation clipping
ratios — are tuned so that the quantized block reproduces the full-precision block on the
inputs it actually receives (the outputs of the quantized blocks before it):

    min_θ Σ_i ‖F̂_ℓ(X_i; θ) − F_ℓ(X_i)‖²_F.

With learned rounding (``round``) θ also holds an offset V ∈ [−1, 1] per ternary weight, and
the block runs with the codes T = clamp(round(T₀ + V), −1, 1) (straight-through): the codes of
the layer-wise solve are a start, not a constraint.

End-to-end (``e2e``): once every block is quantized, the same parameters of all blocks at
once are tuned so that the model's next-token distribution matches the full-precision
model's on the calibration windows,

    min_θ Σ_i Σ_{t ∈ P} KL(p_FP(· | x_i,≤t) ‖ p_θ(· | x_i,≤t)),   P = every ``stride``-th position,

the KL taken over the teacher's most likely tokens and the rest with ``top_k``
(:mod:`twla.quantization.distillation`).

Both are solved by :func:`twla.solvers.reconstruct.reconstruct` (Adam, early stopping on
held-out calibration windows). The stored format does not change: the tuned grid is
rounded to the 16 bits it is stored in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from twla.models.adapters import Adapter
from twla.models.capture import KeptLayers, layer_output, layers_replaced, reloading
from twla.quantization.distillation import TeacherWindow, kl_positions, teacher_log_probs
from twla.quantization.records import refresh_clips
from twla.quantization.sections import EndToEndConfig, ReconstructionConfig
from twla.quantization.tunables import Tunables, products_in
from twla.quantization.weights import QuantizedWeight
from twla.solvers.reconstruct import ReconstructionResult, Scaled, reconstruct

if TYPE_CHECKING:
    from twla.quantization.state import QuantRun

Window = tuple[Tensor, dict]


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


def matmul_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The type of a reconstruction's matrix products on ``device`` (``ReconstructionConfig.precision``)."""
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            cpu = torch.cpu
            native = device.type == "cpu" and (cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
        precision = "bfloat16" if native else "float32"
    return getattr(torch, precision)


def _solve(
    root: nn.Module,
    params: list[Scaled],
    project: Callable[[], None],
    error: Callable[[int], Tensor],
    reference: Callable[[int], Tensor],
    windows: int,
    config: ReconstructionConfig,
    stream: int,
    progress: bool = False,
) -> ReconstructionResult:
    """Tune ``params`` on all windows but the last ``config.holdout`` (which judge the iterates),
    with ``root``'s own parameters frozen; on return they hold their best values. The errors
    are computed with matrix products of ``config.precision``."""
    holdout = min(config.holdout, windows - 1)
    device = params[0].base.device
    dtype = matmul_dtype(config.precision, device)

    def cast_error(i: int) -> Tensor:
        with products_in(dtype, device.type):
            return error(i)

    flags = {p: p.requires_grad for p in root.parameters()}
    root.requires_grad_(False)
    try:
        with torch.enable_grad():
            return reconstruct(
                params,
                cast_error,
                reference,
                train=list(range(windows - holdout)),
                holdout=list(range(windows - holdout, windows)),
                steps=config.steps,
                lr=config.lr,
                batch=config.batch,
                eval_every=config.eval_every,
                patience=config.patience,
                generator=torch.Generator().manual_seed(config.seed * 100_003 + stream),
                project=project,
                progress=progress,
            )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def reconstruct_block(
    layer: nn.Module,
    index: int,
    adapter: Adapter,
    *,
    windows: list[Window],
    targets: list[Tensor],
    weights: dict[str, QuantizedWeight],
    config: ReconstructionConfig,
) -> ReconstructionResult:
    """Tune block ``index``'s grids, norm gains and clipping ratios in place (module docstring);
    ``weights`` (by full linear name) receive the tuned grids. The error of window i is
    ‖F̂(X_i) − Y_i‖², relative to ‖Y_i − X_i‖²."""
    tunables = Tunables.gather(layer, {"": index}, adapter, weights, config)

    def error(i: int) -> Tensor:
        hidden, kwargs = windows[i]
        out = layer_output(functional_call(layer, tunables.overrides(layer), (hidden,), kwargs))
        return ((out - targets[i]) ** 2).sum()

    def reference(i: int) -> Tensor:
        return ((targets[i] - windows[i][0]) ** 2).sum()

    result = _solve(layer, tunables.params(), tunables.project, error, reference, len(windows), config, index)
    tunables.write_back(layer)
    return result


Done = Callable[[int, nn.Module, dict[str, QuantizedWeight]], None]


def _layer_weights(weights: Mapping[str, QuantizedWeight], adapter: Adapter, index: int) -> dict[str, QuantizedWeight]:
    """Layer ``index``'s quantized weights, by linear path within the layer."""
    prefix = f"{adapter.layers}.{index}."
    return {name.removeprefix(prefix): w for name, w in weights.items() if name.startswith(prefix)}


def _kept_blocks(
    adapter: Adapter, kept: KeptLayers, count: int, config: EndToEndConfig, device: torch.device
) -> tuple[list[Tunables], Callable[[int, Tensor, dict], Tensor]]:
    """θ of every kept block (gathered one block at a time), and a decoder layer stand-in that
    reloads block i, runs it with its θ and drops it again. Under autograd the block is
    checkpointed: the backward pass reloads it and recomputes its forward, so only one block's
    weights are ever in memory."""
    tunables = []
    for index in range(count):
        layer, weights = kept.reload(index)
        tunables.append(Tunables.gather(layer.to(device), {"": index}, adapter, weights, config))
        tunables[-1].weights = {}
        kept.unload(index, layer)

    def block(index: int, hidden: Tensor, kwargs: dict) -> Tensor:
        t = tunables[index]

        def run(h: Tensor) -> Tensor:
            layer, weights = kept.reload(index)
            t.weights = _layer_weights(weights, adapter, index)
            try:
                return layer_output(functional_call(layer.to(device), t.overrides(layer), (h,), kwargs))
            finally:
                t.weights = {}
                kept.unload(index, layer)

        if not torch.is_grad_enabled():
            return run(hidden)
        h = hidden if hidden.requires_grad else hidden.detach().requires_grad_()
        return checkpoint(run, h, use_reentrant=True, preserve_rng_state=False)

    return tunables, block


def reconstruct_model(
    model: nn.Module,
    adapter: Adapter,
    calibration: Tensor,
    *,
    teacher: list[TeacherWindow],
    weights: dict[str, QuantizedWeight],
    config: EndToEndConfig,
    device: torch.device,
    progress: bool = False,
    done: Done | None = None,
    kept: KeptLayers | None = None,
) -> ReconstructionResult:
    """Tune every block's grids, norm gains and clipping ratios at once against the full-precision
    model's next-token distribution (module docstring); ``teacher`` from :func:`teacher_log_probs`.
    The error of window i is Σ_t KL relative to its number of positions, so the reported errors are the mean
    KL divergence per compared position, in nats. Each block, once its θ is written back, goes
    to ``done(index, layer, its weights by full name)``.

    kept: the decoder layers are not in ``model`` (they sit on the meta device) but in ``kept``,
    and are reloaded one at a time for every forward and backward pass: the same result, with
    one block's weights in memory; ``weights`` is then unused."""
    keep = kl_positions(calibration.shape[1], config.stride).to(device)
    count = len(adapter.decoder_layers(model))

    def kl(forward: Callable[[Tensor, dict], Tensor]) -> Callable[[int], Tensor]:
        def error(i: int) -> Tensor:
            logits = forward(calibration[i : i + 1].to(device), {"use_cache": False, "logits_to_keep": keep})
            return teacher[i].kl(logits.logits[0])

        return error

    def positions(i: int) -> Tensor:
        return torch.tensor(float(len(keep)))

    def solve(params: list[Scaled], project: Callable[[], None], forward) -> ReconstructionResult:
        model.to(device)
        try:
            return _solve(model, params, project, kl(forward), positions, calibration.shape[0], config, count, progress)
        finally:
            model.to("cpu")

    if kept is None:
        model.to(device)
        tunables = Tunables.gather(model, {f"{adapter.layers}.{i}.": i for i in range(count)}, adapter, weights, config)
        result = solve(
            tunables.params(),
            tunables.project,
            lambda ids, kwargs: functional_call(model, tunables.overrides(model), (ids,), kwargs),
        )
        tunables.write_back(model)
        for index, layer in enumerate(adapter.decoder_layers(model)):
            if done is not None:
                done(index, layer, {n: w for n, w in weights.items() if n.startswith(f"{adapter.layers}.{index}.")})
        return result
    blocks, standin = _kept_blocks(adapter, kept, count, config, device)
    with layers_replaced(model, adapter, standin):
        result = solve(
            [p for t in blocks for p in t.params()],
            lambda: [t.project() for t in blocks],
            lambda ids, kwargs: model(ids, **kwargs),
        )
    for index, t in enumerate(blocks):
        layer, found = kept.reload(index)
        t.weights = _layer_weights(found, adapter, index)
        t.write_back(layer.to(device))
        t.weights = {}
        if done is not None:
            done(index, layer, found)
    return result


# The pipeline's reconstruction stages (:mod:`twla.quantization.pipeline`).


def record_teacher(run: QuantRun) -> None:
    """Stage, before any change to the model: the full-precision next-token distribution that
    end-to-end reconstruction matches, computed with the stage's matrix products (``precision``)."""
    stream = run.stream
    with (
        nullcontext()
        if stream is None
        else layers_replaced(run.model, run.adapter, reloading(stream.load, stream.unload, run.device))
    ):
        e2e = run.config.end_to_end
        run.teacher = teacher_log_probs(
            run.model,
            run.calibration,
            e2e.stride,
            top_k=e2e.top_k,
            device=run.device,
            dtype=matmul_dtype(e2e.precision, run.device),
            progress=run.progress,
        )


def record_block_targets(run: QuantRun) -> None:
    """Stage, per layer, before its linears are quantized: the full-precision block's outputs on
    the calibration windows, which block-wise reconstruction matches."""
    run.layer.to(run.device)
    windows = split_windows(run.batches)
    run.block["windows"], run.block["targets"] = windows, block_targets(run.layer, windows)


def reconstruct_layer(run: QuantRun) -> dict:
    """Stage, per layer: block-wise reconstruction of the quantized layer."""
    block, report = run.block, run.report
    result = reconstruct_block(
        run.layer,
        run.index,
        run.adapter,
        windows=block.pop("windows"),
        targets=block.pop("targets"),
        weights=report.weights,
        config=run.config.reconstruction,
    )
    report.reconstruction.append({"layer": run.index, **result.to_dict()})
    refresh_clips(run.layer, run.index, run.adapter.layers, records=report.records)
    done = report.reconstruction  # the summary: the mean over the blocks reconstructed so far
    return {"held-out error": {k: sum(r[k] for r in done) / len(done) for k in ("before", "after")}}


def reconstruct_end_to_end(run: QuantRun) -> dict:
    """Stage, after the last layer: every block's parameters tuned at once against the teacher."""
    stream = run.stream

    def done(index: int, layer: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
        refresh_clips(layer, index, run.adapter.layers, records=run.report.records)
        if stream is not None:
            (stream.store if run.config.allocation else stream.finish)(index, layer, weights)

    result = reconstruct_model(
        run.model,
        run.adapter,
        run.calibration,
        teacher=run.teacher,
        weights=run.report.weights,
        config=run.config.end_to_end,
        device=run.device,
        progress=run.progress,
        done=done,
        kept=stream,
    )
    dtype = matmul_dtype(run.config.end_to_end.precision, run.device)
    run.report.end_to_end = {**result.to_dict(), "precision": str(dtype).removeprefix("torch.")}
    return {"held-out KL": {"before": result.before, "after": result.after}}
