import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaForCausalLM

from tests.helpers import tiny_llama, tiny_tokenizer
from twla.kernels.dispatch import kernel_backend


@pytest.fixture(autouse=True)
def reference_kernels(request):
    """Tests run on the reference kernels (exact against the fake-quantized model), except those
    marked ``cpu_layout``, which load packed models into the CPU kernel's layout as users do."""
    if request.node.get_closest_marker("cpu_layout"):
        yield
        return
    with kernel_backend("torch"):
        yield


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into the twla cache) and its tokenizer."""
    from twla.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def small_tokenizer():
    """A real BPE tokenizer of 1024 tokens, trained here (the fast tests load no real model)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(small_tokenizer, tmp_path_factory) -> str:
    """A tiny random Llama with a real tokenizer, saved as a local checkpoint."""
    from twla.models.loading import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = tiny_llama(vocab_size=len(small_tokenizer), max_position_embeddings=256)
    save_checkpoint(model, small_tokenizer, str(path))
    return str(path)


def pytest_collection_modifyitems(config, items) -> None:
    """Wall-time assertions (marker ``timing``) run only when ``-m`` asks for them."""
    if "timing" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="asserts wall time: run alone on an idle machine with -m timing")
    for item in items:
        if "timing" in item.keywords:
            item.add_marker(skip)
