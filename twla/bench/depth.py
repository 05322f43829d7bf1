"""Memory and time of quantization as the model grows: layer by layer against the whole model in memory.

Builds Llama-architecture checkpoints with random weights of realistic scale (the models' own
initialization, std 0.02) at each width and depth, saved as sharded safetensors in a temporary
directory, and quantizes each one with the method twice, each run in its own process: one
decoder layer at a time (``quantize_checkpoint``) and with the whole model loaded first
(``load_model`` + ``quantize`` + ``save_packed``). It prints the peak resident memory of each
process and the seconds per decoder layer, and for each width how much more memory the deepest
model needed than the shallowest. Random weights: these are time and memory figures, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

DESCRIPTION = __doc__.split("\n\n")[0]
REPORT_FORMAT = "scale benchmark"  # marks report.json as written by this benchmark
WIDTHS = {  # hidden size → MLP width, heads, kv heads (Llama-family proportions)
    576: (1536, 9, 3),  # SmolLM2-135M
    1024: (2816, 16, 4),
    2048: (5632, 32, 8),  # TinyLlama-1.1B
    4096: (11008, 32, 32),  # LLaMA-2-7B
}
MODES = ("stream", "memory")
HEAD = "| width | depth | mode | peak RSS MB | s / layer | total s | packed MB |\n|---|---|---|---|---|---|---|"


def synthetic_checkpoint(path: str, hidden: int, depth: int, *, vocab: int, seed: int = 0) -> None:
    """A random Llama of the given width and depth, saved to ``path`` in 64 MB safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from twla.models.loading import model_source

    mlp, heads, kv = WIDTHS[hidden]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path, max_shard_size="64MB")
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    model_source("smollm2-135m").tokenizer.save_pretrained(path)  # any tokenizer: the ids are random


def _child(args: argparse.Namespace) -> None:
    """One measured run (in its own process): quantize ``args.checkpoint`` and print a JSON line."""
    from twla.deploy.save import pack_model, save_packed
    from twla.models.loading import load_model, model_source
    from twla.models.memory import resident_memory
    from twla.quantization.config import QuantConfig
    from twla.quantization.pipeline import quantize
    from twla.quantization.streaming import quantize_checkpoint

    source = model_source(args.checkpoint)
    config = QuantConfig.from_method(args.method).with_seed(0)
    calib = torch.randint(0, source.config.vocab_size, (args.nsamples, args.seqlen), generator=torch.Generator())
    start = time.perf_counter()
    if args.child == "stream":
        report, bits = quantize_checkpoint(source, config, calib, path=args.out, method=args.method, progress=False)
    else:
        model, tokenizer = load_model(source)
        model, report = quantize(model, config, calib, progress=False)
        bits = save_packed(pack_model(model, report.weights), tokenizer, args.out, method=args.method)
    seconds = time.perf_counter() - start
    layers = source.config.num_hidden_layers
    print(
        json.dumps(
            {
                "peak_rss_mb": resident_memory()["peak_mb"],
                "seconds": seconds,
                "seconds_per_layer": sum(r.seconds for r in report.records) / layers,
                "packed_mb": bits.file_bytes / 2**20,
            }
        )
    )


def measure(checkpoint: str, mode: str, method: str, *, nsamples: int, seqlen: int, work: str) -> dict:
    """Run one quantization in a fresh process and return its measurements."""
    out = os.path.join(work, f"out-{mode}")
    cmd = [sys.executable, "-m", "twla.bench.depth", "--child", mode, "--checkpoint", checkpoint, "--method", method]
    cmd += ["--nsamples", str(nsamples), "--seqlen", str(seqlen), "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the {mode} run on {checkpoint} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def run_depth(
    *,
    widths: tuple[int, ...] = (576, 1024),
    depths: tuple[int, ...] = (4, 8, 16),
    vocab: int = 8192,
    method: str = "pt2+gptq+ssr+had+a4",
    nsamples: int = 8,
    seqlen: int = 256,
    out: str = "runs/scale",
    overwrite: bool = False,
) -> dict:
    """Quantize random Llama checkpoints of each width and depth with ``method`` on ``nsamples`` ×
    ``seqlen`` random calibration tokens, layer by layer and in memory, each in its own process;
    print the table and write ``out``/report.json unless ``out`` is empty; returns the report."""
    from twla.quantization.config import QuantConfig

    depths = sorted(set(depths))
    unknown = sorted(set(widths) - set(WIDTHS))
    if unknown:
        raise ValueError(f"unknown width(s) {unknown}; choose from {', '.join(map(str, WIDTHS))}")
    if not depths or min(depths) < 1:
        raise ValueError("--depths must be positive layer counts")
    QuantConfig.from_method(method)  # an unknown method fails before the checkpoints are built
    if out:
        from twla.io import check_output_file

        check_output_file(os.path.join(out, "report.json"), REPORT_FORMAT, overwrite=overwrite)
    rows = []
    print(f"{method}, {nsamples} × {seqlen} random calibration tokens; random weights: time and memory")
    print(HEAD)
    with tempfile.TemporaryDirectory(prefix="twla-scale-") as work:
        for hidden in widths:
            for depth in depths:
                checkpoint = os.path.join(work, f"llama-{hidden}-{depth}")
                synthetic_checkpoint(checkpoint, hidden, depth, vocab=vocab)
                for mode in MODES:
                    row = {"width": hidden, "depth": depth, "mode": mode}
                    row.update(measure(checkpoint, mode, method, nsamples=nsamples, seqlen=seqlen, work=work))
                    rows.append(row)
                    print(
                        f"| {hidden} | {depth} | {mode} | {row['peak_rss_mb']:.0f} | {row['seconds_per_layer']:.2f} | "
                        f"{row['seconds']:.1f} | {row['packed_mb']:.1f} |",
                        flush=True,
                    )
                shutil.rmtree(checkpoint)
    growth = []
    for hidden in widths:
        for mode in MODES:
            peak = {r["depth"]: r["peak_rss_mb"] for r in rows if r["width"] == hidden and r["mode"] == mode}
            ratio = peak[depths[-1]] / peak[depths[0]]
            growth.append({"width": hidden, "mode": mode, "depths": [depths[0], depths[-1]], "ratio": ratio})
            print(f"width {hidden}, {mode}: {depths[-1]} layers need {ratio:.2f}× the peak memory of {depths[0]}")
    report = {"method": method, "nsamples": nsamples, "seqlen": seqlen, "rows": rows, "growth": growth}
    if out:
        from twla.io import write_json

        write_json(os.path.join(out, "report.json"), {"format": REPORT_FORMAT, **report})
        print(f"\nReport written to {os.path.join(out, 'report.json')}")
    return report


def main(argv: list[str] | None = None) -> None:
    """One measured run, in the process :func:`measure` starts."""
    parser = argparse.ArgumentParser(description="one measured quantization run of the depth benchmark")
    parser.add_argument("--child", choices=MODES, required=True)
    for name in ("--checkpoint", "--method", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--nsamples", type=int, required=True)
    parser.add_argument("--seqlen", type=int, required=True)
    _child(parser.parse_args(argv))


if __name__ == "__main__":
    main()
