"""``twla kernels``: kernel and packed-decode speed against torch."""

from __future__ import annotations

import argparse

from twla.cli.options import names

DESCRIPTION = "Kernel and decode benchmark: the ternary kernels and packed models against torch fp16, in one run."
MODELS = ("smollm2-135m", "llama-7b")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-gbs", type=float, default=3350.0, help="peak memory bandwidth, GB/s (H100 SXM 3350)")
    p.add_argument("--decode-tokens", type=int, default=128, help="decode steps timed per model (default 128)")
    p.add_argument("--models", default=",".join(MODELS), help=f"decode models ({', '.join(MODELS)}; '' for none)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps (a smoke test)")
    p.add_argument("--out", default="runs/kernels", help="directory for report.json ('' for none)")
    p.add_argument("--overwrite", action="store_true", help="replace a report.json an earlier run wrote")


def run(args: argparse.Namespace) -> None:
    from twla.bench.speed import run_speed

    run_speed(
        peak_gbs=args.peak_gbs,
        decode_tokens=args.decode_tokens,
        models=names(args.models),
        quick=args.quick,
        out=args.out,
        overwrite=args.overwrite,
    )
