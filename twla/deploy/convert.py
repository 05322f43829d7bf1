"""``twla quantize``: one method applied to a model and written as a packed checkpoint, layer by
layer from a checkpoint directory or with the whole model in memory (the same bytes)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from twla.quantization.job import JobConfig
from twla.quantization.presets import DEFAULT_METHOD


@dataclass
class ConvertConfig(JobConfig):
    """method: the method spec; out: the checkpoint directory; seed: the calibration windows' and
    every random choice's; dtype: storage of the unquantized tensors (keep, float16, bfloat16);
    stream: one decoder layer at a time (None: whenever the model is a local directory and the
    method has no weight allocation, which runs the whole model);
    offload: the calibration activations wait in host memory between layers."""

    method: str = DEFAULT_METHOD
    out: str = ""
    seed: int = 0
    dtype: str = "bfloat16"
    stream: bool | None = None
    offload: bool = False


def convert(cfg: ConvertConfig, *, progress: bool = True):
    """Quantize ``cfg.model`` with ``cfg.method`` and write its packed checkpoint to ``cfg.out``;
    returns the quantization report and the sizes counted from the files. Everything that can be
    refused is checked before the model's weights are read."""
    from twla.data.text import bos_token, calibration_windows, load_text, provenance, tokenize
    from twla.deploy.format import is_packed_checkpoint, storage_dtype
    from twla.deploy.save import pack_model, save_packed
    from twla.io import check_output_dir
    from twla.models.loading import check_window_length, load_model, model_reference, model_source, resolve_device
    from twla.quantization.config import QuantConfig
    from twla.quantization.pipeline import quantize
    from twla.quantization.streaming import quantize_checkpoint

    if not cfg.out:
        raise ValueError("name the output checkpoint directory (--out)")
    config = QuantConfig.from_method(
        cfg.method, cfg.overrides, batch_size=cfg.batch_size, layer_windows=cfg.layer_windows
    ).with_seed(cfg.seed)
    config.check_windows(cfg.nsamples)
    config.check_packable(cfg.method)
    dtype = storage_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    source = model_source(cfg.model)
    if cfg.stream and not source.local:
        raise ValueError(f"--stream reads a local checkpoint directory; {cfg.model!r} is a hub id")
    if cfg.stream and not config.streamable:
        raise ValueError(
            f"--stream contradicts {cfg.method!r}: {config.whole_model}; leave --stream out (or pass --in-memory)"
        )
    reference = model_reference(cfg.model)
    protect = [source.path] if source.local else []
    check_output_dir(cfg.out, "packed checkpoint", is_packed_checkpoint, overwrite=cfg.overwrite, protect=protect)
    check_window_length(source, cfg.seqlen, "--seqlen")
    text = load_text(cfg.calibration, "calibration")
    bos = bos_token(source.tokenizer)
    calib = calibration_windows(tokenize(source.tokenizer, text), cfg.nsamples, cfg.seqlen, seed=cfg.seed, bos=bos)
    stream = source.local and config.streamable if cfg.stream is None else cfg.stream
    print(f"{cfg.method}: " + ("one decoder layer at a time" if stream else "whole model in memory"))
    saved = dict(provenance=provenance(text, calib, cfg.seed), dtype=dtype, overwrite=cfg.overwrite)
    if stream:
        report, files = quantize_checkpoint(
            source,
            config,
            calib,
            path=cfg.out,
            method=cfg.method,
            device=device,
            progress=progress,
            reference=reference,
            offload=cfg.offload,
            **saved,
        )
    else:
        model, tokenizer = load_model(source)
        model, report = quantize(model, config, calib, device=device, progress=progress, offload=cfg.offload)
        files = save_packed(
            pack_model(model, report.weights),
            tokenizer,
            cfg.out,
            method=cfg.method,
            config=config.to_dict(),
            report=report.to_dict(),
            source=reference,
            **saved,
        )
    print(f"{cfg.method}: quantized in {report.seconds:.1f} s; saved to {os.path.abspath(cfg.out)}")
    print(files.describe())
    return report, files
