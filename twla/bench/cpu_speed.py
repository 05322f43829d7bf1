"""CPU speed, measured side by side in one run: the ternary linear's CPU paths against torch's
float32 and bfloat16 linears, per shape, and whole models (prefill, decode, weight memory).

Per shape (SmolLM2-135M's and 7B-class linears, M = 1, 16, 512 tokens), milliseconds of

- ``fp32``, ``bf16``: ``F.linear`` with a dense weight of that type;
- ``reference``: the torch reference path (the 2-bit codes unpacked on every call, float32);
- ``int4 A16``, ``int4 A4``: torch's grouped 4-bit kernel on the ternary codes
  (:mod:`twla.kernels.cpu`), with bfloat16 activations or with per-token 4-bit activations;

and the bytes each holds for the weight. Whole models: a batch-1 prefill of 512 tokens and
greedy decoding with a static KV cache, float32 vs bfloat16 vs the same model packed
(W1.58A16, and W1.58A4 with online Kronecker rotations) and loaded into the CPU layout. Weights
are random (speed does not depend on their values); every kernel result is checked first.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from twla.bench.speed import SHAPES, check_close, decode_speed, median_ms, pack_randomly, random_model
from twla.deploy.cpu_layout import to_cpu_layout
from twla.kernels.cpu import int4_available, matmul_int4, to_int4
from twla.kernels.packing import dequantize, random_packed
from twla.kernels.reference import matmul_a16
from twla.kernels.uniform import UNQUANTIZED, ActivationQuant

CPU_BATCHES = (1, 16, 512)
PATHS = ("fp32", "bf16", "reference", "int4 A16", "int4 A4")
A4 = ActivationQuant(4)


def cpu_kernel_rows(
    shapes: dict[str, tuple[int, int]] = SHAPES, batches: tuple[int, ...] = CPU_BATCHES, *, repeat: int = 5
) -> list[dict]:
    """Milliseconds per call of every CPU path (module docstring) for each shape and batch."""
    rows = []
    print(f"{'shape':26s} {'M':>4s} " + " ".join(f"{p + ' ms':>12s}" for p in PATHS) + f" {'fp32/int4':>10s}")
    for name, (N, K) in shapes.items():
        w = random_packed(N, K)
        w4 = to_int4(w)
        W = dequantize(w)
        Wb = W.to(torch.bfloat16)
        memory = {"fp32": 4 * N * K, "bf16": 2 * N * K, "reference": w.packed.nbytes + 2 * 2 * w.alpha.numel()}
        memory["int4 A16"] = memory["int4 A4"] = w4.nbytes()
        for M in batches:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
            check_close(f"{name} M={M} int4 A16", matmul_int4(x, w4, UNQUANTIZED), x @ W.T, 2e-2)
            check_close(f"{name} M={M} int4 A4", matmul_int4(x, w4, A4), A4(x) @ W.T, 2e-2)
            xb = x.to(torch.bfloat16)
            calls = {
                "fp32": partial(F.linear, x, W),
                "bf16": partial(F.linear, xb, Wb),
                "reference": partial(matmul_a16, x, w),
                "int4 A16": partial(matmul_int4, x, w4, UNQUANTIZED),
                "int4 A4": partial(matmul_int4, x, w4, A4),
            }
            ms = {path: median_ms(call, repeat if M < 512 else max(2, repeat // 2)) for path, call in calls.items()}
            rows.append({"shape": name, "N": N, "K": K, "M": M, "ms": ms, "weight_bytes": memory})
            times = " ".join(f"{ms[p]:12.3f}" for p in PATHS)
            print(f"{name:26s} {M:4d} {times} {ms['fp32'] / ms['int4 A4']:10.2f}", flush=True)
    return rows


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each tensor once (tied ones share)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sum(t.nbytes for t in tensors.values())


def model_speed(model: nn.Module, *, prompt: int = 512, tokens: int = 32) -> dict:
    """Prefill of ``prompt`` tokens, decode tokens/s over ``tokens`` steps, and weight MiB."""
    return {**decode_speed(model, prompt=prompt, tokens=tokens), "weight_mib": weight_bytes(model) / 2**20}


def cpu_model_rows(name: str = "smollm2-135m", *, prompt: int = 512, tokens: int = 32) -> list[dict]:
    """float32, bfloat16, W1.58A16 and W1.58A4 + rotations (CPU layout) of one model, one at a time."""
    variants = (
        ("float32", torch.float32, None),
        ("bfloat16", torch.bfloat16, None),
        ("W1.58A16 packed", torch.float32, {"act_bits": 16}),
        ("W1.58A4 + rot packed", torch.float32, {"act_bits": 4, "rotate": True}),
    )
    rows, base = [], None
    head = f"{'prefill s':>10s} {'decode tok/s':>13s} {'vs fp32':>8s} {'weights MiB':>12s}"
    print(f"{'model':14s} {'variant':22s} {head}")
    for label, dtype, packing in variants:
        model = random_model(name, "cpu", dtype)
        if packing is not None:
            pack_randomly(model, **packing)
            to_cpu_layout(model)
        r = model_speed(model, prompt=prompt, tokens=tokens)
        base = base or r
        r = {"model": name, "variant": label, **r, "decode_vs_fp32": r["tokens_per_s"] / base["tokens_per_s"]}
        r["prefill_vs_fp32"] = r["prefill_s"] / base["prefill_s"]
        r["memory_vs_fp32"] = r["weight_mib"] / base["weight_mib"]
        rows.append(r)
        print(
            f"{name:14s} {label:22s} {r['prefill_s']:10.2f} {r['tokens_per_s']:13.1f} {r['decode_vs_fp32']:8.2f} "
            f"{r['weight_mib']:12.1f}",
            flush=True,
        )
        del model
    return rows


def run_cpu_speed(*, quick: bool = False, models: tuple[str, ...] = ("smollm2-135m",)) -> dict:
    """Print the per-shape table and the whole-model rows; returns them for the report."""
    if not int4_available():
        print("This torch has no CPU 4-bit weight kernel: only the reference path runs on the CPU.")
        return {"kernels": [], "models": []}
    threads = torch.get_num_threads()
    print(f"CPU ({threads} threads), per linear, milliseconds per call (median):")
    shapes = dict(list(SHAPES.items())[:1]) if quick else SHAPES
    kernels = cpu_kernel_rows(shapes, (1, 16) if quick else CPU_BATCHES, repeat=2 if quick else 5)
    print("\nWhole model, batch 1: prefill of the prompt, greedy decode with a static KV cache:")
    rows = [r for name in models for r in cpu_model_rows(name, prompt=16 if quick else 512, tokens=4 if quick else 32)]
    return {"threads": threads, "kernels": kernels, "models": rows}
