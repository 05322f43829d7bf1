"""Built-in zero-shot tasks: construction from the books, log-likelihood scoring against an
independent computation, and the refusals."""

import re

import pytest
import torch

from tests.helpers import tiny_llama
from twla.data.text import load_text
from twla.evaluate.tasks import (
    Item,
    Task,
    _score,
    build_tasks,
    check_tasks_disjoint,
    evaluate_task,
    lastword_task,
    nextsent_task,
    sentences,
)


def _flat(text: str) -> str:
    return " ".join(text.replace("_", "").split())


def test_tasks_are_seeded_and_built_as_documented():
    lastword, nextsent = build_tasks(["lastword", "nextsent"])
    assert build_tasks(["lastword"])[0] == lastword  # deterministic
    assert lastword_task(seed=1).items != lastword.items
    assert (len(lastword.items), len(nextsent.items)) == (80, 40)
    book = _flat(load_text("persuasion").text)
    for item in lastword.items:
        (word,) = item.choices
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 5
        assert re.search(rf"\b{word[1:]}\b", item.context)  # the passage holds the answer
        assert len((item.context + word).split()) >= 40
        assert item.context + word in book  # consecutive text of the book
    book = _flat(load_text("northangerabbey").text)
    answers = [item.answer for item in nextsent.items]
    assert set(answers) <= {0, 1, 2, 3} and len(set(answers)) > 1  # the right sentence is not always first
    for item in nextsent.items:
        assert len(set(item.choices)) == 4
        assert item.context + item.choices[item.answer] in book  # the true next sentence follows
        assert all(item.context + c not in book for k, c in enumerate(item.choices) if k != item.answer)


def test_sentences_skip_headings_and_keep_paragraphs():
    paragraphs = sentences(
        'Chapter 1\n\n\nIt was late. "Was it?" she asked.\nHe _said_ yes!\n\nEnd of a long, long line.'
    )
    assert paragraphs == [["It was late.", '"Was it?" she asked.', "He said yes!"], ["End of a long, long line."]]


@pytest.fixture(scope="module")
def model_and_tokenizer(small_tokenizer):
    return tiny_llama(vocab_size=len(small_tokenizer), max_position_embeddings=512).eval(), small_tokenizer


@torch.no_grad()
def test_scores_equal_an_independent_log_likelihood(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    context, continuation = "It is a truth universally acknowledged, that a single man", " in possession"
    ids = tokenizer(context + continuation, add_special_tokens=False).input_ids
    n = len(tokenizer(context, add_special_tokens=False).input_ids)
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids)))
    greedy = all(int(logp[t - 1].argmax()) == ids[t] for t in range(n, len(ids)))
    (loglik, is_greedy), *_ = _score(model, tokenizer, context, [continuation], None)
    assert loglik == pytest.approx(expected, rel=1e-5) and is_greedy == greedy
    # with a BOS token in front, the score is that of the sequence that starts with it
    logp = torch.log_softmax(model(torch.tensor([[7, *ids]])).logits[0].double(), -1)
    expected = sum(float(logp[t, ids[t]]) for t in range(n, len(ids)))
    assert _score(model, tokenizer, context, [continuation], 7)[0][0] == pytest.approx(expected, rel=1e-5)


def test_choices_scored_together_score_as_alone(model_and_tokenizer):
    # the choices of an item share one right-padded forward pass; padding must not change a score
    model, tokenizer = model_and_tokenizer
    context, choices = "She was", (" not", " a very handsome young woman indeed.", " there, and so was he")
    together = _score(model, tokenizer, context, choices, 7)
    alone = [_score(model, tokenizer, context, [c], 7)[0] for c in choices]
    assert [g for _, g in together] == [g for _, g in alone]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone], rel=1e-5)


def test_accuracy_counts_the_best_scored_choice(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    items = [Item("The cat sat on the", (" mat.", " moon and the stars.", " a"), answer) for answer in range(3)]
    scores = [s for s, _ in _score(model, tokenizer, "The cat sat on the", items[0].choices, None)]
    per_char = [s / len(c) for s, c in zip(scores, items[0].choices, strict=True)]
    result = evaluate_task(model, tokenizer, Task("t", "none", "acc_norm", tuple(items)))
    assert result.metrics["acc"] == pytest.approx(1 / 3) and result.metrics["acc_norm"] == pytest.approx(1 / 3)
    best = max(range(3), key=per_char.__getitem__)
    alone = evaluate_task(model, tokenizer, Task("t", "none", "acc_norm", (items[best],)))
    assert alone.value == 1.0 and alone.stderr == 0.0 and alone.items == 1


def test_tasks_refuse_bad_requests():
    with pytest.raises(ValueError, match="unknown built-in task hellaswag"):
        build_tasks(["hellaswag"])
    with pytest.raises(ValueError, match="gives only .* items, fewer than the 100000"):
        nextsent_task(items=100000)
    with pytest.raises(ValueError, match="items must be ≥ 1"):
        lastword_task(items=0)
    with pytest.raises(ValueError, match="built from persuasion, which is in the calibration text"):
        check_tasks_disjoint(build_tasks(["lastword"]), ("emma", "persuasion"))
