"""Bit accounting: everything stored, per quantized linear weight.

Ternary codes cost 1.6 bits each as stored (five a byte in base 3) or log2(3) ≈ 1.58 bits in
entropy terms; every (row, block) stores a 16-bit α and, for asymmetric grids, a 16-bit
μ (uniform integer weights: b-bit codes, a 16-bit scale and a b-bit zero point; structured
ternary: a second code plane in salient columns, a group bit per other weight with two
magnitude groups, 16-bit α, μ per class and β, and the salient column indices); a
reordered layer stores its column permutation (16 bits per index). Embeddings, lm_head,
norms and the online rotation factors are counted separately at 16 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from twla.models.adapters import Adapter
from twla.quantization.fake_quant import ROTATION_BUFFERS
from twla.quantization.weights import QuantizedWeight

FP_BITS = 16
ACCOUNTING_RULES = (
    "bits per quantized linear weight = packed codes (ternary: a byte per 5 codes of a row, base 3, i.e. 1.6 "
    "bits a code; log2 3 in entropy terms; b bits for b-bit integer weights) + 16-bit α and μ per (row, "
    "block of 128 columns, or 64 with g64) "
    "(integer weights: 16-bit scale + b-bit zero point; structured ternary: a second code plane in salient "
    "columns, 1 group bit per other weight with two groups, 16-bit α, μ per class and β, ⌈log2 B⌉ bits per "
    "salient column index) + 16 bits per column index when blocks are reordered "
    "(SSR); embeddings/lm_head, norms and online rotation factors are stored in 16 bits and counted in the "
    "model size only"
)


@dataclass(frozen=True)
class BitReport:
    quantized_weights: int  # number of quantized linear weights
    storage_bits_per_weight: float  # packed codes + scales + permutations
    entropy_bits_per_weight: float  # log2(3) per ternary code + scales + permutations
    embedding_params: int  # embeddings and lm_head (counted once when tied), kept in 16 bits
    other_params: int  # norms, rotation factors and everything else, 16 bits
    size_bytes: int  # whole model as stored (packed codes)
    fp16_size_bytes: int  # whole model in 16 bits

    def describe(self) -> str:
        return (
            f"{self.storage_bits_per_weight:.3f} bits/weight stored (packed codes: 1.6 bits per ternary code; "
            f"16-bit α, μ or scales), {self.entropy_bits_per_weight:.3f} in entropy terms (log2 3 per ternary "
            f"code); embeddings/lm_head, norms and rotation factors in 16 bits"
        )


def count_bits(model: nn.Module, adapter: Adapter, weights: dict[str, QuantizedWeight]) -> BitReport:
    """Bits per quantized weight and model size for a model whose linears are in ``weights``."""
    count = sum(w.codes.numel() for w in weights.values())
    side = sum(w.side_bits() for w in weights.values())
    code_bits = sum(w.code_bits() for w in weights.values())
    entropy_bits = sum(w.code_bits(entropy=True) for w in weights.values())
    quantized_ids = {id(model.get_submodule(name).weight) for name in weights}
    embed_ids = {id(model.get_submodule(adapter.embed).weight), id(model.get_submodule(adapter.head).weight)}
    seen: set[int] = set()
    embedding, other, total = 0, 0, 0
    for p in [*model.parameters(), *(b for name, b in model.named_buffers() if name.endswith(ROTATION_BUFFERS))]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embed_ids:
            embedding += p.numel()
        elif id(p) not in quantized_ids:
            other += p.numel()
    storage = (code_bits + side) / max(count, 1)
    entropy = (entropy_bits + side) / max(count, 1)
    size_bits = math.ceil(code_bits) + side + FP_BITS * (embedding + other)
    return BitReport(
        quantized_weights=count,
        storage_bits_per_weight=storage if count else 16.0,
        entropy_bits_per_weight=entropy if count else 16.0,
        embedding_params=embedding,
        other_params=other,
        size_bytes=math.ceil(size_bits / 8),
        fp16_size_bytes=2 * total,
    )
