import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
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


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into the twla cache) and its tokenizer."""
    from twla.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_checkpoint(smollm2, tmp_path_factory) -> str:
    """A tiny random Llama with the real tokenizer, saved as a local checkpoint."""
    from twla.models import save_checkpoint

    _, tokenizer = smollm2
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256), tokenizer, str(path))
    return str(path)
