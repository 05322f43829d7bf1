"""Test helpers: synthetic inputs and a tiny Llama (imported by the tests; fixtures live in conftest)."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from twla.models.adapters import get_adapter


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


def tiny_gemma3(seed: int = 0):
    """A randomly initialized Gemma-3 text model of :data:`SMALL_CONFIG`'s widths: sandwich norms,
    QK-norm, RMSNorm scaling by 1 + w (its gains drawn around 0), scaled embeddings, and a global
    layer between two sliding-window ones (window 8)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        **{**SMALL_CONFIG, "num_hidden_layers": 3},
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    return model


@contextmanager
def first_blocks(model, count: int = 4) -> Iterator[None]:
    """Inside: ``model`` seen as its first ``count`` decoder blocks (what ``quantize`` works on);
    afterwards the full model again, its first blocks changed in place."""
    adapter = get_adapter(model)
    blocks = adapter.decoder_layers(model)
    types = getattr(model.config, "layer_types", None)
    model.set_submodule(adapter.layers, blocks[:count])
    model.config.num_hidden_layers = count
    if types:
        model.config.layer_types = types[:count]
    try:
        yield
    finally:
        model.set_submodule(adapter.layers, blocks)
        model.config.num_hidden_layers = len(blocks)
        if types:
            model.config.layer_types = types


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained here on the start of a built-in novel (no download, no
    real model): ``<|endoftext|>`` ends (and pads) every text, and no BOS is added, as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from twla.data.text import load_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = load_text("emma").text[:200_000]
    bpe.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
