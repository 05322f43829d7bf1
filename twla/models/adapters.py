"""Architecture adapters: where the decoder layers, linear layers, norms and head live.

Linear layers are grouped by *input site*: layers in one site read the same input
(q/k/v; gate/up), share its statistics S = XᵀX, and later share one rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Site:
    """An input site of a decoder layer: the linears reading one input, and its norm.

    Sites with a norm read the residual stream; ``writes_residual`` marks the sites whose
    linears add their output back into it (o_proj, down_proj).
    """

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    writes_residual: bool = False


@dataclass(frozen=True)
class Adapter:
    """Module paths of a decoder-only architecture (relative to the model or to a layer)."""

    family: str
    layers: str
    embed: str
    final_norm: str
    head: str
    sites: tuple[Site, ...]
    extras: tuple[str, ...] = ()  # modules besides the embedding that run before layer 0
    norm_offset: float = 0.0  # an RMSNorm scales by (norm_offset + weight): Gemma's 1 + w
    # norms applied to a writer's output before the residual add (Gemma's sandwich norms): they
    # act elementwise on the residual basis, so the stream cannot be rotated offline
    post_norms: tuple[str, ...] = ()

    @property
    def residual_rotation(self) -> bool:
        """Whether the residual stream can be rotated offline with the norms folded."""
        return not self.post_norms and self.norm_offset == 0

    def prefix_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that compute layer 0's inputs (embedding, rotary tables)."""
        return [model.get_submodule(p) for p in (self.embed, *self.extras)]

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def site_linears(self, layer: nn.Module, site: Site) -> dict[str, nn.Linear]:
        return {path: layer.get_submodule(path) for path in site.linears}

    def linear_names(self) -> list[str]:
        return [path for site in self.sites for path in site.linears]


_LLAMA_SITES = (
    Site("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    Site("attn_out", ("self_attn.o_proj",), writes_residual=True),
    Site("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    Site("mlp_out", ("mlp.down_proj",), writes_residual=True),
)
_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    extras=("model.rotary_emb",),
)

# Gemma-3 (text): QK-norm inside attention, a norm before and after each sublayer, RMSNorm
# scaling by 1 + w, embeddings scaled by √d inside the embedding module, sliding-window and
# global layers (their own masks and rotary tables, passed per layer).
_GEMMA3_SITES = (
    _LLAMA_SITES[0],
    _LLAMA_SITES[1],
    Site("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
    _LLAMA_SITES[3],
)

# Phi-3: q/k/v in one fused linear and gate/up in another; otherwise Llama's layout
_PHI3_SITES = (
    Site("attn_in", ("self_attn.qkv_proj",), "input_layernorm"),
    _LLAMA_SITES[1],
    Site("mlp_in", ("mlp.gate_up_proj",), "post_attention_layernorm"),
    _LLAMA_SITES[3],
)

ADAPTERS: dict[str, Adapter] = {
    **{
        family: Adapter(family=family, sites=_LLAMA_SITES, **_LLAMA_LIKE)
        for family in ("llama", "mistral", "qwen2", "qwen3")
    },
    "phi3": Adapter(family="phi3", sites=_PHI3_SITES, **_LLAMA_LIKE),
    "gemma3_text": Adapter(
        family="gemma3_text",
        sites=_GEMMA3_SITES,
        norm_offset=1.0,
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        **_LLAMA_LIKE,
    ),
}


def check_architecture(model_type: str | None, label: str = "") -> Adapter:
    """The adapter for ``model_type``, or a clear error naming the supported ones."""
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"unsupported architecture {model_type!r}{label}; "
            f"twla supports model_type in: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model.config.model_type``, or a clear error naming the supported ones."""
    return check_architecture(getattr(getattr(model, "config", None), "model_type", None), f" ({type(model).__name__})")
