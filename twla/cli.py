"""Command line: ``twla bench`` (the main job), ``twla quantize``, ``twla eval``, ``twla kernels``, ``twla solvers``."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from twla.bench import DEFAULT_METHODS, DEFAULT_SAVE, BenchConfig, run_bench
from twla.checkpoint import STORAGE_DTYPES
from twla.config import BASE_METHODS, MODIFIERS
from twla.data import CORPORA, HUB_DATASETS
from twla.kernels import bench as kernel_bench
from twla.kernels.dispatch import BACKENDS
from twla.models import BUILTIN, DEFAULT_MODEL
from twla.solvers.bits import bench as solver_bench

METHOD_HELP = (
    f"methods are a base weight quantizer ({', '.join(BASE_METHODS)}) plus '+'-joined modifiers "
    f"({', '.join(MODIFIERS)}): absmean = BitNet b1.58, twn = ternary weight networks, pt2 = PT²-LLM "
    "asymmetric ternary (ITF + AGA), e2m = E2M-ATQ (ITF with TWLA's rule + exact S-metric refit), rtnN = N-bit "
    "round-to-nearest integer weights; gptq = GPTQ error compensation, ssr = structural similarity reordering; "
    "had / rand / kotms = per-site Kronecker rotations (fixed Hadamard, fixed random orthogonal, learned on the "
    "Stiefel manifold; act = kotms with its activation-outlier term), reloc = E2M stage-2 Stiefel relocation per "
    "site, r1 = residual-stream rotation with RMSNorm folding; aN = N-bit per-token activations (clipping "
    "calibrated per layer), sym = symmetric activations; amp / amp-site = ILA-AMP mixed {2,4,6,8}-bit activations "
    "per decoder block / input site, mean ≤ 4 bits, from measured costs and an exact solver. "
    "Example: e2m+gptq+ssr+kotms+reloc+a4"
)
DATA_HELP = (
    f"a built-in corpus ({', '.join(CORPORA)}), a hub dataset ({', '.join(HUB_DATASETS)}; needs network "
    "and 'datasets'), or a path to a UTF-8 text file; join several with '+'"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in model ({', '.join(BUILTIN)}, offline), local checkpoint directory, or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument("--calibration", default="emma+mansfieldpark", help="calibration text: " + DATA_HELP)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    amp = p.add_argument_group("mixed-precision activations (amp / amp-site methods)")
    amp.add_argument("--amp-budget", type=float, default=4.0, help="mean activation bits (default 4)")
    amp.add_argument("--amp-beta", type=float, default=0.5, help="interaction weight β (default 0.5)")
    amp.add_argument("--amp-options", default="2,4,6,8", help="comma-separated bit-widths (default 2,4,6,8)")
    amp.add_argument("--amp-solver", default="dp", help="bit-allocation solver (default dp; see `twla solvers`)")


def _amp(args: argparse.Namespace) -> dict:
    options = tuple(int(b) for b in args.amp_options.split(",") if b)
    return {"budget": args.amp_budget, "beta": args.amp_beta, "options": options, "solver": args.amp_solver}


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evaluation", default="prideprejudice", help="evaluation text (never the calibration text): " + DATA_HELP
    )
    p.add_argument(
        "--eval-seqlen", type=int, default=512, help="evaluation window length (default 512; 2048 for papers)"
    )
    p.add_argument(
        "--eval-tokens", type=int, default=20480, help="evaluate on the first N tokens (default 20480; 0 = all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twla",
        description="Post-training ternary quantization of causal LMs (W1.58), benched side by side.",
        epilog="Start with `twla bench`: it quantizes the built-in SmolLM2-135M with the default methods, "
        "offline, and writes runs/latest/report.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="quantize a model with several methods and compare them with full precision (the main job)",
        description="Quantize MODEL with each method, evaluate perplexity, bits per weight and time, and write "
        "a report (report.md, report.json, plots) to --out. " + METHOD_HELP,
    )
    _common(bench)
    _eval_args(bench)
    bench.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})",
    )
    bench.add_argument("--out", default="runs/latest", help="report directory (default runs/latest)")
    bench.add_argument(
        "--save",
        default=",".join(DEFAULT_SAVE),
        help="comma-separated ternary methods whose packed checkpoint is written to OUT/models/, loaded back and "
        f"evaluated (default {','.join(DEFAULT_SAVE)} when benched; '' for none)",
    )
    bench.add_argument(
        "--save-dtype",
        default="keep",
        choices=STORAGE_DTYPES,
        help="storage type of the saved checkpoints' unquantized tensors (default keep: as loaded, so the reloaded "
        "model is bit-identical; float16 halves the embeddings)",
    )

    quant = sub.add_parser(
        "quantize",
        help="quantize a model with one method and save the packed checkpoint",
        description="Quantize MODEL with one ternary method and save a packed checkpoint (2-bit codes, α, μ, "
        "rotations, activation settings; twla_quant.json, which also holds the quantization report). Load it with "
        "twla.load_packed or evaluate it with `twla eval`. " + METHOD_HELP,
    )
    _common(quant)
    quant.add_argument("--method", default="e2m+gptq+ssr+had+a4", help="method (default e2m+gptq+ssr+had+a4)")
    quant.add_argument("--out", required=True, help="output checkpoint directory")
    quant.add_argument(
        "--dtype",
        default="float16",
        choices=STORAGE_DTYPES,
        help="storage type of the unquantized tensors (embeddings, norms, rotation factors; default float16; "
        "keep = as loaded, bit-identical)",
    )

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a packed checkpoint: perplexity and sizes from its files",
        description="Load a packed checkpoint written by `twla quantize` or `twla bench --save`, report its bits "
        "per weight and size from the files, and its perplexity.",
    )
    evaluate.add_argument("checkpoint", help="packed checkpoint directory")
    _eval_args(evaluate)
    evaluate.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    evaluate.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    evaluate.add_argument("--kernels", default="auto", choices=BACKENDS, help="kernel backend (default auto)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    kernels = sub.add_parser(
        "kernels",
        help="benchmark the ternary kernels and packed decoding against fp16 (GPU; reference path on CPU)",
        description=kernel_bench.DESCRIPTION,
    )
    kernel_bench.add_arguments(kernels)

    solvers = sub.add_parser(
        "solvers", help="benchmark the activation bit-allocation solvers", description=solver_bench.DESCRIPTION
    )
    solver_bench.add_arguments(solvers)
    return parser


def _bench(args: argparse.Namespace) -> None:
    methods = tuple(m for m in args.methods.split(",") if m)
    save = tuple(m for m in args.save.split(",") if m and m in methods)
    cfg = BenchConfig(
        model=args.model,
        methods=methods,
        calibration=args.calibration,
        evaluation=args.evaluation,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen,
        eval_tokens=args.eval_tokens or None,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
        out=args.out,
        save=save,
        save_dtype=args.save_dtype,
        amp=_amp(args),
    )
    run_bench(cfg, progress=not args.quiet)


def _quantize(args: argparse.Namespace) -> None:
    from twla.checkpoint import pack_model, save_packed, storage_dtype
    from twla.config import QuantConfig, TernaryConfig
    from twla.data import calibration_windows, load_text, tokenize
    from twla.models import load_model
    from twla.quantize import quantize

    config = QuantConfig.from_method(args.method, _amp(args), batch_size=args.batch_size)
    if not isinstance(config.weights, TernaryConfig):
        raise ValueError(f"{args.method}: the packed checkpoint format stores ternary weights, not uniform integers")
    model, tokenizer = load_model(args.model)
    calib = calibration_windows(
        tokenize(tokenizer, load_text(args.calibration, "calibration")), args.nsamples, args.seqlen, args.seed
    )
    model, report = quantize(model, config, calib, args.device, progress=not args.quiet)
    packed = pack_model(model, report.weights)
    dtype = storage_dtype(args.dtype)
    files = save_packed(packed, tokenizer, args.out, args.method, asdict(config), {"report": report.to_dict()}, dtype)
    print(f"{args.method}: quantized in {report.seconds:.1f} s; saved to {os.path.abspath(args.out)}")
    print(files.describe())


def _eval(args: argparse.Namespace) -> None:
    import torch

    from twla.checkpoint import load_packed, packed_bits
    from twla.data import evaluation_windows, load_text, tokenize
    from twla.evaluate import perplexity
    from twla.kernels.dispatch import kernel_backend

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, meta = load_packed(args.checkpoint, dtype=getattr(torch, args.dtype))
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} holds no tokenizer; it is needed to tokenize the evaluation text")
    text = load_text(args.evaluation, "evaluation")
    windows = evaluation_windows(tokenize(tokenizer, text), args.eval_seqlen, args.eval_tokens or None)
    with kernel_backend(args.kernels):
        result = perplexity(model, windows, text.name, args.batch_size, device, not args.quiet)
    print(f"{meta['method'] or args.checkpoint}: perplexity {result.ppl:.4f} on {result.describe()}")
    print(packed_bits(args.checkpoint).describe())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        commands = {
            "bench": _bench,
            "quantize": _quantize,
            "eval": _eval,
            "kernels": kernel_bench.run,
            "solvers": solver_bench.run,
        }
        commands[args.command](args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:
        print(f"twla: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
