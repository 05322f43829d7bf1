"""A packed model made ready for the CPU: every ternary linear in the layout of torch's 4-bit
CPU kernel (:mod:`twla.kernels.cpu`), and the embedding and head in bfloat16.

The conversion happens once, at load; afterwards no call unpacks a weight. The 2-bit codes are
not kept (half a byte per weight instead of a quarter plus the kernel's half), so a converted
model runs but is not saved again: load the checkpoint with the ``torch`` kernel backend to
re-save it. What it computes differs from the reference path only by bfloat16 rounding of α, μ,
of the unquantized activations and of the embedding and head (:mod:`twla.kernels.cpu`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from twla.deploy.ternary_linear import TernaryLinear
from twla.kernels.cpu import Int4Ternary, int4_available, int4_group, matmul_int4, to_int4
from twla.kernels.dispatch import current_backend
from twla.quantization.fake_quant import online_rotation


class CpuTernaryLinear(nn.Module):
    """:class:`TernaryLinear` on the CPU kernel's layout: y = Q_a(x R)_π Ŵ_πᵀ + b."""

    def __init__(self, source: TernaryLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act = source.in_features, source.out_features, source.act
        w = to_int4(source.packed_weight())
        self.group = w.group
        self.register_buffer("int4", w.packed)
        self.register_buffer("scales_zeros", w.scales_zeros)
        self.register_buffer("perm", None if source.perm is None else source.perm.long())
        self.rot1, self.rot2 = source.rot1, source.rot2  # the site's shared factors stay shared
        self.bias = source.bias

    def weight_layout(self) -> Int4Ternary:
        return Int4Ternary(self.int4, self.scales_zeros, self.in_features, self.out_features, self.group)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                "this linear was converted to the CPU kernel's layout when the model was loaded; load the checkpoint "
                f"on {x.device.type} (load_packed(..., device=...)) to run it there"
            )
        shape = x.shape
        x2 = online_rotation(x, self.rot1, self.rot2).reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = matmul_int4(x2, self.weight_layout(), self.act)
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
    return any(isinstance(m, CpuTernaryLinear | Bf16Embedding | Bf16Head) for m in model.modules())


def serves_cpu(module: TernaryLinear) -> bool:
    """Whether the CPU kernel takes this linear: on the CPU, with the ``auto`` kernel backend
    (``torch`` keeps the reference path), a torch that has the kernel and a group it serves."""
    return (
        module.weight.device.type == "cpu"
        and current_backend() == "auto"
        and int4_available()
        and int4_group(module.group_size) is not None
    )


@torch.no_grad()
def to_cpu_layout(model: nn.Module) -> int:
    """Convert, in place, every :class:`TernaryLinear` the CPU kernel serves, and the embedding and
    head to bfloat16; returns how many linears were converted (0: the model is left as it is)."""
    names = [name for name, m in model.named_modules() if isinstance(m, TernaryLinear) and serves_cpu(m)]
    for name in names:
        model.set_submodule(name, CpuTernaryLinear(model.get_submodule(name)))
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
