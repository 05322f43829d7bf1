"""Perplexity: mean next-token NLL over non-overlapping windows, exponentiated."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float
    tokens: int  # predicted tokens: windows · (seqlen − 1)
    windows: int
    seqlen: int
    text: str

    def describe(self) -> str:
        return f"{self.text}: {self.windows} windows × {self.seqlen} tokens ({self.tokens} predicted)"


LOGITS_LIMIT = 2**28  # logits per forward pass (1 GiB in float32)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: Tensor,
    *,
    text: str = "",
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Perplexity:
    """exp of the mean token NLL of ``model`` over the (nwin, seqlen) token ``windows``, in
    batches of ``batch_size`` windows, fewer when their logits would exceed
    :data:`LOGITS_LIMIT` elements (a 262k-token vocabulary: 4 GiB of float32 logits for 8 × 512
    positions). The log-softmax runs one window at a time, so a batch costs its logits and one
    window's log-probabilities, not two more copies of the batch's logits."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, LOGITS_LIMIT // (windows.shape[1] * vocab)))
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits
        for window, ids in zip(logits, batch, strict=True):  # a window at a time: no copy of the batch's logits
            total += float(nn.functional.cross_entropy(window[:-1].float(), ids[1:], reduction="sum"))
        count += batch[:, 1:].numel()
    model.to("cpu")
    mean = total / count
    return Perplexity(math.exp(mean) if mean < 700 else math.inf, mean, count, windows.shape[0], windows.shape[1], text)
