"""``twla eval``: evaluate a packed checkpoint."""

from __future__ import annotations

import argparse

from twla.bench.config import BenchConfig
from twla.cli.options import add_batch_size, add_evaluation, add_runtime, defaults, int_at_least, names

DESCRIPTION = (
    "Load a packed checkpoint written by `twla quantize` or `twla bench --save`, report its bits per weight\n"
    "and size from the files, and its perplexity."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    run = defaults(BenchConfig)
    p.add_argument("checkpoint", help="packed checkpoint directory")
    add_evaluation(p, run)
    add_runtime(p)
    add_batch_size(p, run["batch_size"])
    p.add_argument(
        "--tasks",
        default="",
        help="comma-separated zero-shot tasks: built-in (lastword, nextsent; offline) or lm-evaluation-harness "
        "tasks (e.g. hellaswag, arc_easy; needs twla[lm-eval] and the task's data in the datasets cache)",
    )
    p.add_argument("--limit", type=int_at_least(1), default=None, help="harness tasks: at most N documents")
    p.add_argument("--include-path", default=None, help="harness tasks: a directory of task definitions")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--stream",
        action="store_true",
        help="read the decoder layers from the tensor file one at a time whenever the model runs them (a packed "
        "model larger than memory; the same results)",
    )


def run(args: argparse.Namespace) -> None:
    import torch

    from twla.evaluate.packed import evaluate_packed

    evaluate_packed(
        args.checkpoint,
        evaluation=args.evaluation,
        eval_seqlen=args.eval_seqlen,
        eval_tokens=args.eval_tokens or None,
        tasks=names(args.tasks),
        device=args.device,
        dtype=getattr(torch, args.dtype),
        batch_size=args.batch_size,
        kernels=args.kernels,
        stream=args.stream,
        limit=args.limit,
        include_path=args.include_path,
        progress=not args.quiet,
    )
