"""A packed model made ready for the CPU: every ternary linear, and every integer linear of at most
4 bits, in the layout of torch's 4-bit CPU kernel (:mod:`twla.kernels.cpu`), and the embedding and
head in bfloat16.

The conversion happens once, at load; afterwards no call unpacks a weight. The packed codes are
not kept (half a byte per weight instead of a quarter plus the kernel's half), so a converted
model runs but is not saved again: load the checkpoint with the ``torch`` kernel backend to
re-save it. What it computes differs from the reference path only by bfloat16 rounding of α, μ,
of the unquantized activations and of the embedding and head (:mod:`twla.kernels.cpu`).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from twla.deploy.integer_linear import IntegerLinear
from twla.deploy.packed_linear import PackedLinear
from twla.kernels.cpu import (
    Int4Weight,
    int4_available,
    int4_group,
    int4_mm,
    integer_to_int4,
    matmul_int4,
    to_int4,
    token_codes,
)
from twla.kernels.dispatch import current_backend
from twla.kernels.uniform import ActivationQuant
from twla.quantization.fake_quant import online_rotation

T = TypeVar("T")


class SiteInput:
    """What the linears of one site share, computed once: they are called one after another on
    the same tensor x (q, k, v; gate, up), so the first call's results serve the others while x is
    unchanged (the same object at the same version). That is the rotated input x R (R = R₁ ⊗ R₂)
    and, for the linears that quantize it with the same bits and grid, their codes at once
    (:func:`token_codes` with one clipping ratio per linear). Once every linear of the site has
    been served, the results are let go (an evaluation batch's would otherwise stay in memory, site after site)."""

    def __init__(self, R1: Tensor, R2: Tensor) -> None:
        self.R1, self.R2 = R1, R2
        self.acts: list[ActivationQuant] = []
        self.members = 0
        self.served = 0
        self.x: Tensor | None = None
        self.version = -1
        self.rotated: Tensor | None = None
        self.codes: tuple[Tensor, Tensor] | None = None

    def join(self, act: ActivationQuant) -> int | None:
        """Enrol a linear that quantizes with ``act``: its slot among the site's codes, or None
        when its bits or grid differ from the others' (it quantizes alone)."""
        self.members += 1
        grid = (act.bits, act.symmetric)
        if not act.quantized or (self.acts and grid != (self.acts[0].bits, self.acts[0].symmetric)):
            return None
        self.acts.append(act)
        return len(self.acts) - 1

    def _refresh(self, x: Tensor) -> None:
        if x is self.x and x._version == self.version:
            return
        self.rotated = online_rotation(x, self.R1, self.R2)
        self.x, self.version, self.codes, self.served = x, x._version, None, 0

    def _serve(self, value: T) -> T:
        self.served += 1
        if self.served >= self.members:
            self.x = self.rotated = self.codes = None
        return value

    def rotate(self, x: Tensor) -> Tensor:
        self._refresh(x)
        return self._serve(self.rotated)

    def quantized(self, x: Tensor, slot: int) -> tuple[Tensor, Tensor]:
        """The bfloat16 codes q − z (M, K) and scales (M, 1) of the linear in ``slot``."""
        self._refresh(x)
        if self.codes is None:
            first = self.acts[0]
            clips = torch.tensor([float(a.clip) for a in self.acts]).view(-1, 1, 1)
            flat = self.rotated.reshape(-1, self.rotated.shape[-1]).float()
            q, scale = token_codes(flat, first.bits, clips, first.symmetric)
            self.codes = (q.to(torch.bfloat16), scale)
        return self._serve((self.codes[0][slot], self.codes[1][slot]))


class CpuLinear(nn.Module):
    """A ternary or an at most 4-bit integer packed linear on the CPU kernel's layout:
    y = Q_a(x R)_π Ŵ_πᵀ + b."""

    def __init__(self, source: PackedLinear, site: SiteInput | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act = source.in_features, source.out_features, source.act
        convert = integer_to_int4 if isinstance(source, IntegerLinear) else to_int4
        w = convert(source.packed_weight())
        self.group = w.group
        self.register_buffer("int4", w.packed)
        self.register_buffer("scales_zeros", w.scales_zeros)
        self.register_buffer("perm", None if source.perm is None else source.perm.long())
        self.rot1, self.rot2 = source.rot1, source.rot2  # the site's shared factors stay shared
        self.site = site if site is not None or source.rot1 is None else SiteInput(source.rot1, source.rot2)
        self.slot = None if self.site is None else self.site.join(self.act)
        self.bias = source.bias

    def weight_layout(self) -> Int4Weight:
        scales_zeros = self.scales_zeros  # the kernel takes bfloat16 whatever dtype the model was cast to
        if scales_zeros.dtype != torch.bfloat16:
            self.scales_zeros = scales_zeros = scales_zeros.to(torch.bfloat16)
        return Int4Weight(self.int4, scales_zeros, self.in_features, self.out_features, self.group)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                "this linear was converted to the CPU kernel's layout when the model was loaded; load the checkpoint "
                f"on {x.device.type} (load_packed(..., device=...)) to run it there"
            )
        shape = x.shape
        if self.slot is not None:  # codes shared with the site: permuting codes = quantizing permuted inputs
            q, scale = self.site.quantized(x, self.slot)
            y = torch.mul(int4_mm(q if self.perm is None else q[:, self.perm], self.weight_layout()), scale)
        else:
            x2 = (x if self.site is None else self.site.rotate(x)).reshape(-1, self.in_features)
            y = matmul_int4(x2 if self.perm is None else x2[:, self.perm], self.weight_layout(), self.act)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rot = f"{self.rot1.shape[-1]}⊗{self.rot2.shape[-1]}" if self.rot1 is not None else "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}, "
            f"reordered={self.perm is not None}, rotation={rot}, {self.act.describe()}"
        )


class Bf16Embedding(nn.Module):
    """An embedding table held in bfloat16 that returns rows in ``dtype``."""

    def __init__(self, table: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", table)
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)


class Bf16Head(nn.Module):
    """The output head x Eᵀ with E in bfloat16 (the embedding's table when they are tied): x is
    rounded to bfloat16, the products summed in float32, the logits returned in float32."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).float()


def converted(model: nn.Module) -> bool:
    """Whether ``model`` holds modules of the CPU layout (which are not saved)."""
    return any(isinstance(m, CpuLinear | Bf16Embedding | Bf16Head) for m in model.modules())


def serves_cpu(module: PackedLinear) -> bool:
    """Whether the CPU kernel takes this linear: on the CPU, with the ``auto`` kernel backend
    (``torch`` keeps the reference path), a torch that has the kernel, a group it serves and
    ternary or at most 4-bit codes."""
    return (
        module.weight.device.type == "cpu"
        and current_backend() == "auto"
        and int4_available()
        and int4_group(module.group_size) is not None
        and (not isinstance(module, IntegerLinear) or module.bits <= 4)
    )


@torch.no_grad()
def to_cpu_layout(model: nn.Module) -> int:
    """Convert, in place, every packed linear the CPU kernel serves, and the embedding and head to
    bfloat16; returns how many linears were converted (0: the model is left as it is)."""
    names = [name for name, m in model.named_modules() if isinstance(m, PackedLinear) and serves_cpu(m)]
    sites: dict[int, SiteInput] = {}  # one per pair of rotation factors, i.e. per site
    for name in names:
        source = model.get_submodule(name)
        site = None if source.rot1 is None else sites.setdefault(id(source.rot1), SiteInput(source.rot1, source.rot2))
        model.set_submodule(name, CpuLinear(source, site))
    if names:
        _bfloat16_ends(model)
    return len(names)


def _bfloat16_ends(model: nn.Module) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    dtype = embed.weight.dtype
    table = embed.weight.detach().to(torch.bfloat16)
    model.set_input_embeddings(Bf16Embedding(table, dtype))
    if head is not None and head.bias is None:
        tied = head.weight is embed.weight
        model.set_output_embeddings(Bf16Head(table if tied else head.weight.detach().to(torch.bfloat16)))
