"""``twla scale``: peak memory and time of quantization against depth."""

from __future__ import annotations

import argparse

from twla.cli.options import int_list

DESCRIPTION = "Memory and time of quantization as the model grows: layer by layer against the whole model in memory."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", type=int_list, default=(576, 1024), help="hidden sizes (576, 1024, 2048, 4096)")
    p.add_argument("--depths", type=int_list, default=(4, 8, 16), help="decoder layers per model (default 4,8,16)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the random models")
    p.add_argument("--method", default="pt2+gptq+ssr+had+a4", help="method to time (default pt2+gptq+ssr+had+a4)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (random ids)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    p.add_argument("--out", default="runs/scale", help="directory for report.json ('' for none)")
    p.add_argument("--overwrite", action="store_true", help="replace a report.json an earlier run wrote")


def run(args: argparse.Namespace) -> None:
    from twla.bench.depth import run_depth

    run_depth(
        widths=args.widths,
        depths=args.depths,
        vocab=args.vocab,
        method=args.method,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        out=args.out,
        overwrite=args.overwrite,
    )
