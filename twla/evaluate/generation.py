"""Text from a (quantized) model: prompts through the chat template, streamed and timed
generation, and the fixed prompts whose continuations the bench report shows side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

# continued by every benched model (greedy, no chat template) so that the report shows what
# the numbers mean; plain English that none of the built-in books contains verbatim
REPORT_PROMPTS = (
    "The capital of France is",
    "Water is made of hydrogen and",
    "Once upon a time, in a small village by the sea,",
)
REPORT_TOKENS = 24


@dataclass(frozen=True)
class Generation:
    """A continuation and how fast it came: ``prefill_seconds`` until the first new token (the
    prompt's forward pass), ``seconds`` in all; the other new tokens are the decoding."""

    text: str
    new_tokens: int
    seconds: float
    prefill_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first (one forward pass of one token each)."""
        decode = self.seconds - self.prefill_seconds
        return (self.new_tokens - 1) / decode if decode > 0 and self.new_tokens > 1 else float("nan")

    def speed(self, prompt_tokens: int) -> str:
        """``prefill … tokens/s, decode … tokens/s`` for a prompt of ``prompt_tokens`` tokens."""
        prefill = prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")
        return (
            f"prefill {prompt_tokens} tokens in {self.prefill_seconds:.2f} s ({prefill:.1f} tokens/s), "
            f"decode {self.decode_tokens_per_second:.1f} tokens/s"
        )


class _FirstToken(BaseStreamer):
    """Notes when the first new token arrives, and hands every token on to ``inner``."""

    def __init__(self, inner: BaseStreamer | None) -> None:
        self.inner, self.calls, self.first = inner, 0, None

    def put(self, value: Tensor) -> None:
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2:
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def encode_prompt(tokenizer, prompt: str, *, chat: bool | None = None) -> Tensor:
    """The prompt's token ids (1, T): as a user turn of the tokenizer's chat template (with the
    assistant's turn opened) when ``chat`` is True, or None and the tokenizer has a template;
    the plain text otherwise."""
    if not prompt:
        raise ValueError("the prompt is empty")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise ValueError("--chat: the model's tokenizer has no chat template")
    if has_template if chat is None else chat:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    ids: Tensor,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    stream: bool = False,
) -> Generation:
    """Continue ``ids`` (1, T) by up to ``max_new_tokens`` tokens: greedy by default, or sampled
    at ``temperature`` from the 50 likeliest tokens within nucleus ``top_p``, from ``seed``;
    ``stream`` prints tokens to stdout as they come. The model stops early at its
    end-of-sequence token."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    if sample:
        torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timer = _FirstToken(TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        streamer=timer,
        **options,
    )
    end = time.perf_counter()
    new = out[0, ids.shape[1] :]
    first = timer.first if timer.first is not None else end
    return Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), end - start, first - start)


def continuations(
    model, tokenizer, *, prompts: tuple[str, ...] = REPORT_PROMPTS, tokens: int = REPORT_TOKENS
) -> list[str]:
    """Greedy continuations of ``prompts`` (plain text, no chat template), one per prompt."""
    return [
        generate(model, tokenizer, encode_prompt(tokenizer, p, chat=False), max_new_tokens=tokens).text for p in prompts
    ]
