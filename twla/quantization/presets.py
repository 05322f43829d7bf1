"""Preset method lists: the default W1.58A4 method and the method sets that ``twla bench --methods``
names (the main job's rows, the ablation of the default, the quality-vs-bits frontier)."""

from __future__ import annotations

DEFAULT_METHOD = "pt2+gptq+had+amp-fisher+recon+e2e"  # the default W1.58A4 method; `twla quantize` uses it


# The main job's rows: they fit its time budget (under 40 minutes on the slower 2-core machine
# measured). `--methods pt2+gptq+recon,default,rtn4+had+a4` adds W1.58A16 with block-wise
# reconstruction and a W4A4 round-to-nearest reference (about 20 minutes more).
DEFAULT_METHODS = (
    "pt2+gptq+had+a4",  # W1.58A4 with fixed random Kronecker-Hadamard site rotations
    DEFAULT_METHOD,  # + block-wise, then end-to-end reconstruction, then ILA-AMP's activation bits
)


# The default method, each of its components taken away (ILA-AMP's mixed activation bits first:
# uniform 4 bits), SSR's column reordering added (it did not lower the default's perplexity over
# three seeds, so the default leaves it out), and TWLA's E2M code rule in place of PT²-LLM's.
ABLATION_METHODS = (
    DEFAULT_METHOD,
    "pt2+gptq+had+a4+recon+e2e",
    "e2m+gptq+had+amp-fisher+recon+e2e",
    "pt2+gptq+ssr+had+amp-fisher+recon+e2e",
    "pt2+gptq+had+amp-fisher+recon",
    "pt2+gptq+had+amp-fisher+e2e",
    "pt2+gptq+amp-fisher+recon+e2e",
    "pt2+had+amp-fisher+recon+e2e",
)


# Perplexity against stored bits per weight, at A16 and at A4 (with Hadamard rotations): ternary
# variants (plain, g64, structured, mixed with int3/int4 linears at 2.5 bits), and uniform
# int2/int3/int4 GPTQ weights with grids per 128 and per 64 columns.
_FRONTIER_WEIGHTS = (
    "pt2+gptq+ssr",
    "pt2+gptq+ssr+recon",
    "pt2+gptq+ssr+g64+recon",
    "pt2+gptq+ssr+sal+recon",
    "pt2+gptq+ssr+struct+recon",
    "pt2+gptq+ssr+wmix+recon",
    *(f"rtn{b}+gptq{g}" for b in (2, 3, 4) for g in ("", "+g64")),
    "rtn2+gptq+g64+recon",
)


FRONTIER_METHODS = (
    *_FRONTIER_WEIGHTS,
    *(spec.removesuffix("+recon") + "+had+a4" + "+recon" * spec.endswith("+recon") for spec in _FRONTIER_WEIGHTS),
)


METHOD_SETS = {"default": DEFAULT_METHODS, "ablation": ABLATION_METHODS, "frontier": FRONTIER_METHODS}


def resolve_methods(names: tuple[str, ...]) -> tuple[str, ...]:
    """Expand the preset names of :data:`METHOD_SETS` in a method list, keeping order, each method once."""
    expanded = [spec for name in names for spec in METHOD_SETS.get(name.strip().lower(), (name,))]
    return tuple(dict.fromkeys(expanded))
