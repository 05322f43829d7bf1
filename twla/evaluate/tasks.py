"""Zero-shot accuracy on tasks built from the shipped public-domain books, offline.

Both tasks are built deterministically from a seed, from books that the default calibration
(Emma, Mansfield Park) and evaluation (Pride and Prejudice) texts do not use, and are scored
by log-likelihood as lm-evaluation-harness scores its tasks: a continuation's score is
Σ log p(token | context, earlier tokens) over its tokens, where the continuation's tokens
are those the tokenizer gives ``context + continuation`` beyond the context's own.

- ``lastword`` (final-word prediction, LAMBADA-style; Persuasion): a passage of at least
  40 words of consecutive sentences of one paragraph group, whose final word has ≥ 4
  letters and occurs earlier in the passage (so the passage, not general knowledge, decides
  it); correct when greedy decoding gives every token of the word (``acc``).
- ``nextsent`` (next sentence among four; Northanger Abbey): two consecutive sentences,
  then the sentence that follows and three distractors drawn from the same book at least
  50 sentences away, of a similar number of words; correct when the true sentence has the
  highest log-likelihood per character (``acc_norm``; ``acc`` unnormalized is reported too).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from twla.data.text import load_text


@dataclass(frozen=True)
class Item:
    """A context and its candidate continuations (each with its leading space); ``answer``
    indexes the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Task:
    name: str
    corpus: str  # the built-in book it is made from
    metric: str  # the headline metric: acc (greedy final word) or acc_norm (choice)
    items: tuple[Item, ...]


@dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    value: float  # the headline metric
    stderr: float  # √(p(1 − p)/n)
    items: int
    metrics: dict  # every metric the task reports

    def describe(self) -> str:
        return f"{self.task} {self.metric} {self.value:.3f} ± {self.stderr:.3f} ({self.items} items)"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])|(?<=[.!?][\"'])\s+(?=[\"'(]?[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")


def sentences(text: str) -> list[list[str]]:
    """The book as paragraphs of sentences: blank lines separate paragraphs, line breaks
    inside one are spaces, underscores (italics) are dropped; headings and other paragraphs of
    one sentence under 5 words are skipped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.replace("_", "")):
        flat = " ".join(block.split())
        parts = [s for s in _SENTENCE_END.split(flat) if s]
        if len(parts) > 1 or (parts and len(parts[0].split()) >= 5):
            paragraphs.append(parts)
    return paragraphs


def lastword_task(corpus: str = "persuasion", *, items: int = 80, seed: int = 0, min_words: int = 40) -> Task:
    """Final-word prediction (module docstring); ``items`` passages drawn with ``seed``."""
    candidates = []
    for paragraph in sentences(load_text(corpus).text):
        for end in range(len(paragraph)):
            words = paragraph[end].split()
            match = _WORD.fullmatch(words[-1].strip(".!?,;:\"'")) if words else None
            if not match or len(match.group()) < 4 or not words[-1].rstrip("\"'").endswith((".", "!", "?")):
                continue
            start = end
            while start > 0 and sum(len(s.split()) for s in paragraph[start : end + 1]) < min_words:
                start -= 1
            passage = " ".join(paragraph[start : end + 1])
            target = match.group()
            context = passage[: passage.rindex(target)].rstrip()
            if len(passage.split()) >= min_words and re.search(rf"\b{target}\b", context):
                candidates.append(Item(context, (" " + target,), 0))
    return Task("lastword", corpus, "acc", _draw(candidates, items, seed, "lastword", corpus))


def nextsent_task(
    corpus: str = "northangerabbey", *, items: int = 40, seed: int = 0, choices: int = 4, words: tuple = (6, 25)
) -> Task:
    """Next sentence among ``choices`` (module docstring); ``items`` drawn with ``seed``."""
    flat = [(i, s) for i, paragraph in enumerate(sentences(load_text(corpus).text)) for s in paragraph]
    sizes = [len(s.split()) for _, s in flat]
    rng = random.Random(seed)
    candidates = []
    for k in range(2, len(flat)):
        same_paragraph = flat[k - 2][0] == flat[k][0]
        if not same_paragraph or not all(words[0] <= sizes[j] <= words[1] for j in (k - 2, k - 1, k)):
            continue
        pool = [j for j in range(len(flat)) if abs(j - k) >= 50 and abs(sizes[j] - sizes[k]) <= max(2, sizes[k] // 4)]
        if len(pool) < choices - 1:
            continue
        options = [flat[k][1], *(flat[j][1] for j in rng.sample(pool, choices - 1))]
        order = list(range(choices))
        rng.shuffle(order)
        context = f"{flat[k - 2][1]} {flat[k - 1][1]}"
        candidates.append(Item(context, tuple(" " + options[o] for o in order), order.index(0)))
    return Task("nextsent", corpus, "acc_norm", _draw(candidates, items, seed, "nextsent", corpus))


def _draw(candidates: list[Item], items: int, seed: int, name: str, corpus: str) -> tuple[Item, ...]:
    if items < 1:
        raise ValueError(f"{name}: items must be ≥ 1, got {items}")
    if len(candidates) < items:
        raise ValueError(f"{name}: {corpus} gives only {len(candidates)} items, fewer than the {items} asked for")
    return tuple(random.Random(seed).sample(candidates, items))


TASKS: dict[str, Callable[..., Task]] = {"lastword": lastword_task, "nextsent": nextsent_task}


def build_tasks(names: Sequence[str], seed: int = 0) -> list[Task]:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown built-in task {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return [TASKS[name](seed=seed) for name in names]


def check_tasks_disjoint(tasks: Sequence[Task], calibration_parts: Sequence[str]) -> None:
    """A task must not be made from a book the model was calibrated on."""
    for task in tasks:
        if task.corpus in calibration_parts:
            raise ValueError(
                f"task {task.name} is built from {task.corpus}, which is in the calibration text; "
                "calibrate on other books or leave the task out"
            )


def _continuation_tokens(tokenizer, context: str, ctx: list[int], continuation: str) -> list[int]:
    """The tokens ``context + continuation`` gives beyond the context's own tokens ``ctx``."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: keep the pieces apart
        return tokenizer(continuation, add_special_tokens=False).input_ids
    return whole[len(ctx) :]


@torch.no_grad()
def _score(
    model: nn.Module, tokenizer, context: str, continuations: Sequence[str], bos: int | None
) -> list[tuple[float, bool]]:
    """(Σ log p of the continuation's tokens, whether greedy decoding gives all of them) for each
    continuation of one context, in one forward pass: the sequences are padded on the right,
    which the causal model's earlier positions never see (up to float rounding, which can move
    a 4-bit activation across a rounding boundary when the padded length changes)."""
    device = next(model.parameters()).device
    text = tokenizer(context, add_special_tokens=False).input_ids
    targets = [_continuation_tokens(tokenizer, context, text, c) for c in continuations]
    ctx = ([] if bos is None else [bos]) + text
    inputs = [ctx + target[:-1] for target in targets]
    length = max(map(len, inputs))
    ids = torch.tensor([seq + [seq[-1]] * (length - len(seq)) for seq in inputs], device=device)
    # every continuation is predicted from position len(ctx) − 1 on: keep the logits from there
    logits = model(ids, use_cache=False, logits_to_keep=length - len(ctx) + 1).logits.float()
    scores = []
    for row, target in enumerate(targets):
        own, target_ids = logits[row, : len(target)], torch.tensor(target, device=device)
        logp = torch.log_softmax(own, dim=-1).gather(1, target_ids[:, None]).sum()
        scores.append((float(logp), bool((own.argmax(-1) == target_ids).all())))
    return scores


def evaluate_task(
    model: nn.Module, tokenizer, task: Task, *, bos: int | None = None, progress: bool = False
) -> TaskResult:
    """Score every item of ``task`` (``bos``: the token every window starts with, if any). An
    item with one continuation is right when greedy decoding gives it (acc); one with several
    when the right one scores highest (acc) and highest per character (acc_norm)."""
    correct = {"acc": 0} if task.metric == "acc" else {"acc": 0, "acc_norm": 0}
    for item in tqdm(task.items, desc=task.name, disable=not progress):
        scores = _score(model, tokenizer, item.context, item.choices, bos)
        if len(item.choices) == 1:
            correct["acc"] += scores[0][1]
            continue
        loglik = [s for s, _ in scores]
        per_char = [s / len(c) for s, c in zip(loglik, item.choices, strict=True)]
        correct["acc"] += max(range(len(loglik)), key=loglik.__getitem__) == item.answer
        correct["acc_norm"] += max(range(len(per_char)), key=per_char.__getitem__) == item.answer
    n = len(task.items)
    metrics = {k: v / n for k, v in correct.items()}
    value = metrics[task.metric]
    return TaskResult(task.name, task.metric, value, math.sqrt(value * (1 - value) / n), n, metrics)


def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: Sequence[Task], *, bos: int | None, device: torch.device, progress: bool = False
) -> list[TaskResult]:
    model.to(device)
    results = [evaluate_task(model, tokenizer, task, bos=bos, progress=progress) for task in tasks]
    model.to("cpu")
    return results
