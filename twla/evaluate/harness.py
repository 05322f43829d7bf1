"""lm-evaluation-harness on a loaded (packed) model: ``twla eval CKPT --tasks hellaswag,...``.

The harness is an optional extra (``pip install 'twla[lm-eval]'``). Its tasks read their data
through ``datasets``; offline, a task runs only when its data is in the local datasets cache
(or the task is defined over local files, ``include_path``); otherwise the error says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def run_harness(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    device: str = "cpu",
    limit: int | None = None,
    include_path: str | None = None,
) -> dict[str, dict]:
    """Evaluate ``model`` on the harness's ``tasks`` (zero-shot); returns the harness's results
    per task (metric → value, e.g. ``"acc,none"``). ``limit``: at most this many documents per
    task; ``include_path``: a directory of further task definitions. Offline unless
    ``HF_DATASETS_OFFLINE`` is set otherwise before the first import of ``datasets``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError(
            f"tasks {', '.join(tasks)} run through lm-evaluation-harness: pip install 'twla[lm-eval]'"
        ) from err
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-evaluation-harness knows no task {', '.join(unknown)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=0)
    except Exception as err:  # a dataset that cannot be fetched surfaces as any of several errors
        raise RuntimeError(
            f"lm-evaluation-harness could not run {', '.join(tasks)} ({type(err).__name__}: {err}); offline, a task's "
            "data must already be in the datasets cache (HF_DATASETS_OFFLINE=1), or use the built-in tasks"
        ) from err
    return {task: dict(out["results"][task]) for task in tasks}
