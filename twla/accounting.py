"""Bit accounting (DESIGN §6): everything stored, per quantized linear weight.

Codes cost 2 bits each when 2-bit packed (storage) or log2(3) ≈ 1.58 bits in entropy
terms; every (row, block) stores a 16-bit α and, for asymmetric grids, a 16-bit μ;
a reordered layer stores its column permutation (16 bits per index). Embeddings,
lm_head and norms are counted separately at 16 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from twla.adapters import Adapter
from twla.weights import TernaryWeight

SCALE_BITS = 16
INDEX_BITS = 16
FP_BITS = 16


@dataclass(frozen=True)
class BitReport:
    quantized_weights: int  # number of ternary weights
    storage_bits_per_weight: float  # 2-bit packed codes + scales + permutations
    entropy_bits_per_weight: float  # log2(3) codes + scales + permutations
    embedding_params: int  # embeddings and lm_head (counted once when tied), kept in 16 bits
    other_params: int  # norms and everything else, 16 bits
    size_bytes: int  # whole model as stored (packed codes)
    fp16_size_bytes: int  # whole model in 16 bits

    def describe(self) -> str:
        return (
            f"{self.storage_bits_per_weight:.3f} bits/weight stored (2-bit packed codes + 16-bit α, μ), "
            f"{self.entropy_bits_per_weight:.3f} in entropy terms (log2 3 per code); "
            f"embeddings/lm_head in 16 bits"
        )


def side_bits(w: TernaryWeight) -> int:
    """Bits of everything stored besides the codes: α, μ per (row, block), permutation."""
    n, m = w.shape
    bits = w.alpha.numel() * SCALE_BITS
    if w.has_offset:
        bits += w.mu.numel() * SCALE_BITS
    if w.is_reordered():
        bits += m * INDEX_BITS
    return bits


def count_bits(model: nn.Module, adapter: Adapter, weights: dict[str, TernaryWeight]) -> BitReport:
    """Bits per quantized weight and model size for a model whose linears are in ``weights``."""
    count = sum(w.codes.numel() for w in weights.values())
    side = sum(side_bits(w) for w in weights.values())
    quantized_ids = {id(model.get_submodule(name).weight) for name in weights}
    embed_ids = {id(model.get_submodule(adapter.embed).weight), id(model.get_submodule(adapter.head).weight)}
    seen: set[int] = set()
    embedding, other, total = 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embed_ids:
            embedding += p.numel()
        elif id(p) not in quantized_ids:
            other += p.numel()
    storage = (2 * count + side) / max(count, 1)
    entropy = (math.log2(3) * count + side) / max(count, 1)
    size_bits = 2 * count + side + FP_BITS * (embedding + other)
    return BitReport(
        quantized_weights=count,
        storage_bits_per_weight=storage if count else 16.0,
        entropy_bits_per_weight=entropy if count else 16.0,
        embedding_params=embedding,
        other_params=other,
        size_bytes=math.ceil(size_bits / 8),
        fp16_size_bytes=2 * total,
    )
