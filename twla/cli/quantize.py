"""``twla quantize``: one method, saved as a packed checkpoint."""

from __future__ import annotations

import argparse

from twla.cli.options import add_quantization, defaults, method_epilog, overrides
from twla.deploy.convert import ConvertConfig

DESCRIPTION = (
    "Quantize MODEL with one ternary method and save a packed checkpoint (ternary codes in base 3, α, μ, rotations,\n"
    "activation settings; twla_quant.json, which also holds the quantization report). Load it with\n"
    "twla.load_packed or evaluate it with `twla eval`."
)
epilog = method_epilog


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = defaults(ConvertConfig)
    add_quantization(p, run)
    p.add_argument("--method", default=run["method"], help=f"method (default {run['method']})")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument(
        "--dtype",
        default=run["dtype"],
        choices=("keep", "float16", "bfloat16"),
        help=f"storage type of the unquantized matrices (embeddings, head; default {run['dtype']}; "
        "keep = as loaded, bit-identical; norms and rotation factors are always kept)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream",
        dest="stream",
        action="store_true",
        default=None,
        help="read, quantize and write one decoder layer at a time (the default for a checkpoint directory or a "
        "built-in model, except with +wmix, whose costs run the whole model)",
    )
    mode.add_argument("--in-memory", dest="stream", action="store_false", help="load the whole model first")
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep the calibration activations between layers in host memory, not on the GPU (same result)",
    )


def run(args: argparse.Namespace) -> None:
    from twla.deploy.convert import convert

    cfg = ConvertConfig(
        model=args.model,
        calibration=args.calibration,
        nsamples=args.nsamples,
        layer_windows=args.layer_windows,
        seqlen=args.seqlen,
        device=args.device,
        batch_size=args.batch_size,
        overrides=overrides(args, (args.method,)),
        overwrite=args.overwrite,
        method=args.method,
        out=args.out,
        seed=args.seed or 0,
        dtype=args.dtype,
        stream=args.stream,
        offload=args.offload_activations,
    )
    convert(cfg, progress=not args.quiet)
