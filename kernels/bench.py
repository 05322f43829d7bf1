"""Kernel benchmark: the ternary kernels against torch fp16 matmul, side by side in one run.

    python -m twla.kernels.bench [--peak-gbs 3350]

Shapes: the default model's (SmolLM2-135M) and 7B-class linears, at M = 1, 16, 128, 2048.
Weights are random ternary (speed does not depend on values). For M = 1 it prints the
fraction of peak memory bandwidth reached (bytes of weights, scales and activations
moved / time / peak). Without a GPU it times the torch reference path on CPU and says
that the GPU rows were not measured.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from twla.kernels.reference import PackedTernary, matmul_a16, pack_ternary, quantize_activations

SHAPES = {
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "7b q/k/v/o 4096x4096": (4096, 4096),
    "7b gate/up 11008x4096": (11008, 4096),
    "7b down 4096x11008": (4096, 11008),
}
BATCHES = (1, 16, 128, 2048)


def random_packed(N: int, K: int, group_size: int = 128, device: str = "cpu", seed: int = 0) -> PackedTernary:
    """Random ternary codes with α ∈ [0.1, 1.1) and μ ~ 0.1·N(0, 1) per (row, group), packed."""
    g = torch.Generator().manual_seed(seed)
    T = (torch.randint(0, 3, (N, K), generator=g) - 1).to(torch.int8)
    G = -(-K // group_size)
    w = pack_ternary(T, torch.rand(N, G, generator=g) + 0.1, torch.randn(N, G, generator=g) * 0.1, group_size)
    return w.to(device)


def _cpu_rows() -> None:
    print("No CUDA GPU: timing the torch reference path on CPU; GPU rows were not measured.")
    print(f"{'shape':28s} {'M':>5s} {'fp32 matmul ms':>15s} {'reference ms':>13s}")
    for name, (N, K) in list(SHAPES.items())[:3]:
        w = random_packed(N, K)
        W = torch.randn(N, K)
        for M in (1, 16, 128):
            x = torch.randn(M, K)
            t = []
            for fn in (partial(torch.matmul, x, W.T), partial(matmul_a16, x, w)):
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                t.append((time.perf_counter() - start) / 10 * 1e3)
            print(f"{name:28s} {M:5d} {t[0]:15.3f} {t[1]:13.3f}")


def _gpu_rows(peak_gbs: float) -> None:
    from triton.testing import do_bench

    from twla.kernels.triton_ternary import ternary_matmul

    dev = torch.cuda.get_device_name()
    print(f"{dev}; peak bandwidth taken as {peak_gbs:.0f} GB/s; times are medians of triton.testing.do_bench")
    head = f"{'shape':26s} {'M':>5s} {'fp16 ms':>9s} {'A16 ms':>9s} {'int8 ms':>9s} {'fp16/A16':>9s} {'fp16/int8':>9s}"
    print(head + f" {'BW% A16':>8s} {'BW% int8':>8s} {'BW% fp16':>8s}")
    for name, (N, K) in SHAPES.items():
        w = random_packed(N, K, device="cuda")
        W = torch.randn(N, K, device="cuda", dtype=torch.float16)
        for M in BATCHES:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            q, s = quantize_activations(x, 4)
            y_ref = matmul_a16(x.float(), w).float()
            err = (ternary_matmul(x, w).float() - y_ref).abs().max() / y_ref.abs().max()
            if err > 1e-2:
                raise RuntimeError(f"{name} M={M}: A16 kernel disagrees with the reference (rel. err {err:.2e})")
            t_fp = do_bench(partial(torch.matmul, x, W.T))
            t_a16 = do_bench(partial(ternary_matmul, x, w))
            t_int = do_bench(partial(ternary_matmul, q, w, s))
            row = f"{name:26s} {M:5d} {t_fp:9.4f} {t_a16:9.4f} {t_int:9.4f} {t_fp / t_a16:9.2f} {t_fp / t_int:9.2f}"
            if M == 1:
                wbytes = w.packed.numel() + 8 * w.alpha.numel()
                bw = [(b + 2 * (K + N)) / (t * 1e-3) / 1e9 / peak_gbs * 100 for b, t in
                      ((wbytes, t_a16), (wbytes, t_int), (2 * N * K, t_fp))]  # fmt: skip
                row += f" {bw[0]:8.1f} {bw[1]:8.1f} {bw[2]:8.1f}"
            print(row, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peak-gbs", type=float, default=3350.0, help="peak memory bandwidth, GB/s (H100 SXM 3350)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        _gpu_rows(args.peak_gbs)
    else:
        _cpu_rows()


if __name__ == "__main__":
    main()
