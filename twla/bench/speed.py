"""Kernel and decode benchmark: the ternary kernels and packed models against torch fp16, in one run.

    twla kernels [--peak-gbs 3350] [--decode-tokens 128] [--models smollm2-135m,llama-7b]

1. Kernels, for the default model's (SmolLM2-135M) and 7B-class linears at M = 1, 16, 128,
   2048: torch fp16 ``matmul`` against the A16 kernel and the int8 path (4-bit activations;
   GEMM alone, and with the fused quantization kernel), with ratios and, for M = 1, the
   fraction of peak memory bandwidth reached (bytes of weights, scales and activations moved
   / time / peak). Every kernel result is checked against the torch reference first.
2. Decode: tokens/s of batch-1 greedy decoding (static KV cache, CUDA graphs where they can
   be captured) of randomly initialized models of real shapes: fp16 against the same model
   with every decoder linear packed (W1.58A16, and W1.58A4 with online Kronecker rotations).

Weights are random (speed does not depend on their values; never all zeros). Without a GPU
it times the torch reference path on CPU at small shapes and says the GPU rows were not measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from twla.io import check_output_file, write_json
from twla.kernels.packing import random_packed
from twla.kernels.reference import matmul_a16, matmul_int, quantize_activations, weight_sums
from twla.kernels.uniform import ActivationQuant
from twla.models.adapters import get_adapter

DESCRIPTION = __doc__.split("\n\n")[0]
SHAPES = {  # (N outputs, K inputs)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "7b q/k/v/o 4096x4096": (4096, 4096),
    "7b gate/up 11008x4096": (11008, 4096),
    "7b down 4096x11008": (4096, 11008),
}
BATCHES = (1, 16, 128, 2048)
MODELS = {  # Llama-architecture shapes of real models
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
}
TARGET_SHAPE = "7b down 4096x11008"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA, wall clock on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn)
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12))
    if err > tol:
        raise RuntimeError(f"{name}: kernel disagrees with the torch reference (relative error {err:.2e})")


def kernel_rows(peak_gbs: float, shapes: dict[str, tuple[int, int]], batches: tuple[int, ...]) -> list[dict]:
    """Time the kernels against fp16 matmul on CUDA (see the module docstring)."""
    from twla.kernels.triton_quant import quantize_activations_triton
    from twla.kernels.triton_ternary import ternary_matmul

    rows = []
    for name, (N, K) in shapes.items():
        w = random_packed(N, K, device="cuda")
        wsum = weight_sums(w)
        W = torch.randn(N, K, device="cuda", dtype=torch.float16)
        for M in batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            a = quantize_activations(x, 4)
            check_close(f"{name} M={M} A16", ternary_matmul(x, w), matmul_a16(x.float(), w), 1e-2)
            check_close(f"{name} M={M} int8", ternary_matmul(a, w, wsum=wsum), matmul_int(a, w), 1e-4)

            def fused(x=x, w=w, wsum=wsum):
                return ternary_matmul(quantize_activations_triton(x, 4), w, wsum=wsum)

            t = {
                "fp16": median_ms(partial(torch.matmul, x, W.T), 0),
                "a16": median_ms(partial(ternary_matmul, x, w), 0),
                "int8": median_ms(partial(ternary_matmul, a, w, wsum), 0),
                "int8+quant": median_ms(fused, 0),
            }
            row = {"shape": name, "N": N, "K": K, "M": M, **{f"{k} ms": v for k, v in t.items()}}
            if M == 1:
                wbytes = w.packed.numel() + 2 * 2 * w.alpha.numel()  # codes, fp16 α and μ as stored
                moved = {"a16": wbytes + 2 * K + 2 * N, "int8": wbytes + K + 4 * N, "fp16": 2 * N * K + 2 * K + 2 * N}
                for k, b in moved.items():
                    row[f"BW% {k}"] = b / (t[k] * 1e-3) / 1e9 / peak_gbs * 100
            rows.append(row)
            print(_format_kernel_row(row), flush=True)
    return rows


KERNEL_HEAD = (
    f"{'shape':26s} {'M':>5s} {'fp16 ms':>9s} {'A16 ms':>9s} {'int8 ms':>9s} {'+quant ms':>9s} "
    f"{'fp16/A16':>8s} {'fp16/int8':>9s} {'BW% A16':>8s} {'BW% int8':>8s} {'BW% fp16':>8s}"
)


def _format_kernel_row(r: dict) -> str:
    line = (
        f"{r['shape']:26s} {r['M']:5d} {r['fp16 ms']:9.4f} {r['a16 ms']:9.4f} {r['int8 ms']:9.4f} "
        f"{r['int8+quant ms']:9.4f} {r['fp16 ms'] / r['a16 ms']:8.2f} {r['fp16 ms'] / r['int8 ms']:9.2f}"
    )
    if "BW% a16" in r:
        line += f" {r['BW% a16']:8.1f} {r['BW% int8']:8.1f} {r['BW% fp16']:8.1f}"
    return line


def targets(rows: list[dict]) -> list[str]:
    """The kernel targets, judged on the measured rows."""
    lines = []
    gemv = [r for r in rows if r["shape"] == TARGET_SHAPE and r["M"] == 1]
    for r in gemv:
        best = max(("a16", "int8"), key=lambda k: r[f"BW% {k}"])
        bw, speedup = r[f"BW% {best}"], r["fp16 ms"] / r[f"{best} ms"]
        ok = bw > 50 and speedup >= 3
        lines.append(
            f"decode GEMV {TARGET_SHAPE}, M=1 ({best}): {bw:.1f}% of bandwidth, {speedup:.2f}× fp16 "
            f"(target > 50% and ≥ 3×): {'met' if ok else 'missed'}"
        )
    for r in (r for r in rows if r["M"] == 2048):
        ratio = r["fp16 ms"] / r["int8 ms"]
        lines.append(
            f"int8 path {r['shape']}, M=2048: {ratio:.2f}× fp16 (target ≥ 1×): {'met' if ratio >= 1 else 'missed'}"
        )
    return lines


def random_model(name: str, device: str, dtype: torch.dtype, *, seed: int = 0) -> nn.Module:
    """A randomly initialized Llama-architecture model of the shapes in :data:`MODELS`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[name], max_position_embeddings=4096), dtype=dtype)
    return model.eval()


def pack_randomly(model: nn.Module, *, act_bits: int = 16, rotate: bool = False, seed: int = 0) -> nn.Module:
    """Replace every decoder linear by a :class:`~twla.deploy.ternary_linear.TernaryLinear` with random
    codes (and, when ``rotate``, one random orthogonal Kronecker input rotation per site, shared by
    its linears as in a packed checkpoint), in place."""
    from twla.deploy.ternary_linear import TernaryLinear
    from twla.solvers.kronecker import kron_factors, random_orthogonal

    g = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    index = 0
    for layer in adapter.decoder_layers(model):
        for site in adapter.sites:
            owner = None
            for path, old in adapter.site_linears(layer, site).items():
                device = old.weight.device
                K, N = old.in_features, old.out_features
                rotation = kron_factors(K) if rotate else None
                with torch.device(device):
                    new = TernaryLinear(K, N, 128, rotation=rotation, act=ActivationQuant(act_bits))
                w = random_packed(N, K, device=device, seed=seed * 100003 + index)
                index += 1
                new.weight.copy_(w.stored())
                new.alpha.copy_(w.alpha)
                new.mu.copy_(w.mu)
                if rotation and owner is None:
                    new.rot1.copy_(random_orthogonal(rotation[0], g, dtype=torch.float32))
                    new.rot2.copy_(random_orthogonal(rotation[1], g, dtype=torch.float32))
                    owner = new
                elif rotation:
                    new.share_rotation(owner)
                new.refresh()
                layer.set_submodule(path, new)
    return model


@torch.no_grad()
def decode_speed(model: nn.Module, *, prompt: int = 16, tokens: int = 128, graphs: bool = True) -> dict:
    """Batch-1 greedy decoding with a static KV cache: tokens/s over ``tokens`` steps after a
    ``prompt``-token prefill (timed too, ``prefill_s``). On CUDA one decode step is captured in a
    CUDA graph and replayed; if capture fails, the steps run eagerly and the reason is returned."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    length = prompt + tokens + 8
    cache = StaticCache(config=model.config, max_cache_len=length)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    logits = model(input_ids=ids.to(device), past_key_values=cache, cache_position=torch.arange(prompt, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    token = logits.logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt], device=device)

    def step() -> None:
        out = model(input_ids=token, past_key_values=cache, cache_position=position).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    mode, note = "eager", ""
    if device.type == "cuda" and graphs:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run, mode = graph.replay, "cuda graph"
        except Exception as err:  # capture is best effort: report why and time eagerly
            run, note = step, f"graph capture failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    else:
        run = step
    position.fill_(prompt + 4)
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps = min(tokens, length - int(position.item()) - 1)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_s": steps / seconds,
        "ms_per_token": seconds / steps * 1e3,
        "prefill_s": prefill,
        "mode": mode,
        "note": note,
    }


def decode_rows(models: list[str], tokens: int, device: str, *, dtype: torch.dtype) -> list[dict]:
    """fp16 (or the CPU dtype), W1.58A16 and W1.58A4 + rotations, one model at a time."""
    rows = []
    for name in models:
        model = random_model(name, device, dtype)
        variants = (("fp", None), ("W1.58A16", {"act_bits": 16}), ("W1.58A4 + rot", {"act_bits": 4, "rotate": True}))
        base = None
        for label, packing in variants:
            if packing is not None:
                pack_randomly(model, **packing)
            r = decode_speed(model, tokens=tokens)
            base = base or r["tokens_per_s"]
            label = f"{str(dtype).removeprefix('torch.')}" if packing is None else label
            r = {"model": name, "variant": label, **r, "speedup": r["tokens_per_s"] / base}
            rows.append(r)
            print(
                f"{name:14s} {label:20s} {r['tokens_per_s']:10.1f} {r['ms_per_token']:9.3f} {r['speedup']:8.2f} "
                f"{r['mode']:10s} {r['note']}",
                flush=True,
            )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


DECODE_HEAD = f"{'model':14s} {'variant':20s} {'tokens/s':>10s} {'ms/token':>9s} {'vs fp':>8s} {'mode':10s}"


REPORT_FORMAT = "kernel benchmark"  # marks report.json as written by this benchmark


def run_speed(
    *,
    peak_gbs: float = 3350.0,
    decode_tokens: int = 128,
    models: tuple[str, ...] = tuple(MODELS),
    quick: bool = False,
    out: str = "runs/kernels",
    overwrite: bool = False,
) -> dict:
    """Time the kernels and packed decoding against torch (on CUDA; the reference path on the CPU),
    print the tables, and write ``out``/report.json unless ``out`` is empty; returns the report.
    ``peak_gbs`` is the memory bandwidth that the bandwidth fractions are taken against."""
    models = [m for m in models if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown decode model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    if out:
        check_output_file(os.path.join(out, "report.json"), REPORT_FORMAT, overwrite=overwrite)
    if not torch.cuda.is_available():
        from twla.bench.cpu_speed import run_cpu_speed

        print("No CUDA GPU: the GPU rows (Triton kernels, fp16, CUDA graphs) were not measured.")
        cpu_models = tuple(m for m in models if m == "smollm2-135m")
        cpu = run_cpu_speed(quick=quick, models=cpu_models)
        if set(models) - set(cpu_models):
            print("llama-7b is not run whole on the CPU (its float32 weights alone are 27 GB); its linears are above.")
        return _write(out, peak_gbs, {"device": "cpu", **cpu, "targets": []})
    print(f"{torch.cuda.get_device_name()}; peak bandwidth taken as {peak_gbs:.0f} GB/s; kernel times are "
          "medians of triton.testing.do_bench")  # fmt: skip
    print(KERNEL_HEAD)
    shapes = dict(list(SHAPES.items())[-1:]) if quick else SHAPES
    kernels = kernel_rows(peak_gbs, shapes, (1, 2048) if quick else BATCHES)
    verdicts = targets(kernels)
    print("\n" + "\n".join(verdicts))
    print("\nDecode, batch 1, static KV cache:")
    print(DECODE_HEAD)
    decode = decode_rows(models, 16 if quick else decode_tokens, "cuda", dtype=torch.float16)
    report = {"device": torch.cuda.get_device_name(), "kernels": kernels, "decode": decode, "targets": verdicts}
    return _write(out, peak_gbs, report)


def _write(out: str, peak_gbs: float, report: dict) -> dict:
    if out:
        write_json(os.path.join(out, "report.json"), {"format": REPORT_FORMAT, "peak_gbs": peak_gbs, **report})
        print(f"\nReport written to {os.path.join(out, 'report.json')}")
    return report
