"""``twla eval``: a packed checkpoint's perplexity and zero-shot accuracy, read from its files."""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from twla.data.text import (
    OVERLAP_LIMIT,
    bos_token,
    calibration_overlap,
    evaluation_windows,
    load_text,
    tokenize,
)
from twla.deploy.format import packed_bits
from twla.deploy.load import load_packed
from twla.deploy.streamed import streamed_packed
from twla.evaluate.perplexity import perplexity
from twla.evaluate.tasks import TASKS, build_tasks, check_tasks_disjoint, evaluate_tasks
from twla.kernels.dispatch import kernel_backend
from twla.models.loading import resolve_device


def evaluate_packed(
    checkpoint: str,
    *,
    evaluation: str = "prideprejudice",
    eval_seqlen: int = 512,
    eval_tokens: int | None = 20480,
    tasks: tuple[str, ...] = (),
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    kernels: str = "auto",
    stream: bool = False,
    limit: int | None = None,
    include_path: str | None = None,
    progress: bool = True,
) -> None:
    """Print the perplexity of ``checkpoint`` on the first ``eval_tokens`` tokens of ``evaluation``,
    its score on ``tasks`` (built-in ones, or lm-evaluation-harness tasks with ``limit`` and
    ``include_path``) and its sizes counted from the files. ``stream`` reads the decoder layers
    from the tensor file one at a time (built-in tasks only)."""
    device = resolve_device(device)
    text = load_text(evaluation, "evaluation")
    harness = [t for t in tasks if t not in TASKS]
    if stream and harness:
        raise ValueError("--stream evaluates perplexity and the built-in tasks; drop it for harness tasks")
    with streamed_packed(checkpoint, device=device, dtype=dtype) if stream else nullcontext() as streamed:
        if streamed is None:
            with kernel_backend(kernels):  # the CPU layout is chosen at load
                streamed = load_packed(checkpoint, dtype=dtype, device=device)
        model, tokenizer, meta = streamed
        if tokenizer is None:
            raise ValueError(f"{checkpoint} holds no tokenizer; it is needed to tokenize the evaluation text")
        ids = tokenize(tokenizer, text)
        bos = bos_token(tokenizer)
        windows = evaluation_windows(ids, eval_seqlen, max_tokens=eval_tokens, bos=bos)
        shared = calibration_overlap(meta.get("provenance", {}), ids)
        if shared is not None and shared >= OVERLAP_LIMIT:
            print(
                f"twla: WARNING: {100 * shared:.0f}% of the sampled calibration text of {checkpoint} occurs in the "
                f"evaluation text {text.name}: this perplexity is measured on text the model was calibrated on",
                file=sys.stderr,
            )
        builtin = build_tasks([t for t in tasks if t in TASKS])
        check_tasks_disjoint(builtin, meta.get("provenance", {}).get("calibration", {}).get("sources", ()))
        label = meta["method"] or checkpoint
        with kernel_backend(kernels):
            result = perplexity(model, windows, text=text.name, batch_size=batch_size, device=device, progress=progress)
            print(f"{label}: perplexity {result.ppl:.4f} on {result.describe()}")
            for task in evaluate_tasks(model, tokenizer, builtin, bos=bos, device=device, progress=progress):
                print(f"{label}: {task.describe()}")
            if harness:
                from twla.evaluate.harness import run_harness

                scores = run_harness(
                    model.to(device),
                    tokenizer,
                    harness,
                    batch_size=batch_size,
                    device=device,
                    limit=limit,
                    include_path=include_path,
                )
                for task, metrics in scores.items():
                    values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                    print(f"{label}: {task} (lm-evaluation-harness) {values}")
    print(packed_bits(checkpoint).describe())
