"""``twla bench``: the main job."""

from __future__ import annotations

import argparse

from twla.bench.config import DEFAULT_SAVE, DEFAULT_TASKS, BenchConfig
from twla.cli.options import add_evaluation, add_quantization, defaults, method_epilog, names, overrides
from twla.quantization.presets import METHOD_SETS, resolve_methods

DESCRIPTION = (
    "Quantize MODEL with each method, evaluate perplexity, zero-shot accuracy, bits per weight and time,\n"
    "and write a report (report.md, report.json, plots) to --out."
)
epilog = method_epilog


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = defaults(BenchConfig)
    add_quantization(p, run)
    add_evaluation(p, run)
    p.add_argument(
        "--methods",
        default="default",
        help="comma-separated methods and presets; a preset expands to its methods: "
        + "; ".join(f"{name} = {','.join(specs)}" for name, specs in METHOD_SETS.items())
        + " (default: default)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: every method runs once per seed and the report gives mean ± std "
        "(default: --seed, or 0)",
    )
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated built-in zero-shot tasks scored for every row (default {','.join(DEFAULT_TASKS)}; "
        "'' for none)",
    )
    p.add_argument("--out", default=run["out"], help=f"report directory (default {run['out']})")
    p.add_argument(
        "--save",
        default=None,
        help="comma-separated ternary methods, each among --methods, whose packed checkpoint is written to "
        f"OUT/models/, loaded back and evaluated (default: those of {','.join(DEFAULT_SAVE)} that are benched; "
        "'' for none)",
    )
    p.add_argument(
        "--save-dtype",
        default=run["save_dtype"],
        choices=("keep", "float16", "bfloat16"),
        help="storage type of the saved checkpoints' embeddings and head (default bfloat16, which halves them; "
        "keep: as loaded, so the reloaded model is bit-identical)",
    )


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    """The bench's seeds from --seeds or --seed (not both)."""
    if args.seeds is None:
        return (args.seed or 0,)
    if args.seed is not None:
        raise ValueError("give either --seed or --seeds, not both")
    try:  # BenchConfig checks the values (at least one, distinct, ≥ 0)
        return tuple(int(s) for s in names(args.seeds))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None


def run(args: argparse.Namespace) -> None:
    from twla.bench.run import run_bench

    methods = names(args.methods)
    benched = resolve_methods(methods)  # BenchConfig resolves the presets again, after its own checks
    save = tuple(m for m in DEFAULT_SAVE if m in benched) if args.save is None else names(args.save)
    cfg = BenchConfig(
        model=args.model,
        methods=methods,
        calibration=args.calibration,
        evaluation=args.evaluation,
        nsamples=args.nsamples,
        layer_windows=args.layer_windows,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen,
        eval_tokens=args.eval_tokens or None,
        seeds=_seeds(args),
        device=args.device,
        batch_size=args.batch_size,
        out=args.out,
        save=save,
        save_dtype=args.save_dtype,
        overrides=overrides(args, benched),
        overwrite=args.overwrite,
        tasks=names(args.tasks),
    )
    run_bench(cfg, progress=not args.quiet)
