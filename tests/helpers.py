"""Test helpers: synthetic inputs and a tiny Llama (imported by the tests; fixtures live in conftest)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def correlated_inputs(n_tokens: int, m: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated (nearly rank m/4), unevenly scaled features, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    rank = max(1, m // 4)
    low = torch.randn(n_tokens, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, m, generator=g, dtype=torch.float64
    )
    noise = 0.1 * torch.randn(n_tokens, m, generator=g, dtype=torch.float64)
    return (low + noise) * torch.logspace(-1, 1, m, dtype=torch.float64)


# A tiny decoder whose MLP width (160) leaves a partial 128-column block.
SMALL_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialized Llama of :data:`SMALL_CONFIG` with tied embeddings."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL_CONFIG, "tie_word_embeddings": True, **overrides})).eval()
