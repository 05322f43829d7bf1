"""Compile every Triton kernel variant for a GPU architecture, without a GPU.

    python -m twla.kernels.aot [--arch 90]

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not whether
they compile: this lowers each variant (A16 fp16/bf16 and int8 GEMM and GEMV, with and
without the zero-point term; the quantization kernel, symmetric or not, with and without a
column order) through Triton's CUDA backend to a cubin for ``sm_<arch>`` and reports the
shared memory each needs and how its PTX reads global memory (vector loads ``ld.global.v*``,
16-byte asynchronous copies to shared memory, scalar 1-2 byte loads). The pointers and the
shape and stride arguments are taken as multiples of 16, which is how a launch specializes
them for the usual shapes. Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from twla.kernels import triton_quant, triton_ternary

_I32 = "i32"
_TERNARY_POINTERS = {
    "p_ptr": "*u8",
    "a_ptr": "*fp32",
    "mu_ptr": "*fp32",
    "r_ptr": "*i32",
    "s_ptr": "*fp32",
    "z_ptr": "*fp32",
    "wsum_ptr": "*fp32",
    "y_ptr": "*fp32",
}
_TERNARY_SCALARS = ("G", "groups_per_split", "stride_xm", "stride_rm", "stride_ym", "stride_ys")


def variants() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) for every variant the launchers use."""
    out = []
    for act in ("fp16", "bf16", "i8"):
        for has_zero in (False, True) if act == "i8" else (False,):
            for kind, kernel in (("gemm", triton_ternary._gemm_kernel), ("gemv", triton_ternary._gemv_kernel)):
                scalars = ("M", "N", "K") if kind == "gemm" else ("N", "K")
                signature = {"x_ptr": f"*{act}", **_TERNARY_POINTERS, **dict.fromkeys(scalars + _TERNARY_SCALARS, _I32)}
                constexprs = {
                    "GROUP_P": 32,
                    "LAST_Q": 32,
                    "BLOCK_N": 128,
                    "BLOCK_P": triton_ternary.BLOCK_P,
                    "INT_ACT": act == "i8",
                    "HAS_ZERO": has_zero,
                    "PAD": 0x55,
                }
                if kind == "gemm":
                    constexprs["BLOCK_M"] = 64
                signature.update(dict.fromkeys(constexprs, "constexpr"))
                name = f"{kind} x={act}" + (" zero-point" if has_zero else "")
                out.append((name, kernel, signature, constexprs, {"enable_fp_fusion": True}))
    for symmetric in (False, True):
        for has_perm in (False, True):
            levels = 7 if symmetric else 15
            signature = {
                "x_ptr": "*fp16",
                "perm_ptr": "*i64",
                "q_ptr": "*i8",
                "s_ptr": "*fp32",
                "z_ptr": "*fp32",
                "r_ptr": "*i32",
                **dict.fromkeys(("K", "G", "stride_xm", "stride_qm", "stride_rm"), _I32),
                "clip": "fp32",
            }
            constexprs = {
                "SYMMETRIC": symmetric,
                "LEVELS": levels,
                "QLO": -levels if symmetric else 0,
                "QHI": levels,
                "SHIFT": 0 if symmetric else 8,
                "HAS_PERM": has_perm,
                "GROUP": 128,
                "CHUNK": triton_quant.CHUNK,
            }
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            name = f"quantize {'symmetric' if symmetric else 'asymmetric'}" + (" permuted" if has_perm else "")
            out.append((name, triton_quant._quantize_kernel, signature, constexprs, {"enable_fp_fusion": False}))
    return out


_DIVISIBLE = re.compile(r"_ptr$|^(K|N|stride_\w+)$")  # arguments a launch sees as multiples of 16
_LOADS = {
    "vector": r"ld\.global(\.\w+)*\.v[248]\.",
    "async 16 B": r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(0x10|16)\s*[,;]",
    "scalar 1-2 B": r"ld\.global(\.\w+)*\.[bsu](8|16)\s",
}


def global_loads(ptx: str) -> dict[str, int]:
    """How many global-memory reads of each kind the PTX holds (see the module docstring)."""
    return {kind: len(re.findall(pattern, ptx)) for kind, pattern in _LOADS.items()}


def compile_all(arch: int = 90, *, num_warps: int = 4, num_stages: int = 2) -> list[dict]:
    """Compile every variant for ``sm_<arch>``; a list of {name, shared_bytes, loads} (raises on
    failure)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (before Triton is imported)")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for name, kernel, signature, constexprs, options in variants():
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature) if _DIVISIBLE.search(arg)}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(
                source, target=target, options={"num_warps": num_warps, "num_stages": num_stages, **options}
            )
        except Exception as err:
            raise RuntimeError(f"{name} does not compile for sm_{arch}: {err}") from err
        results.append(
            {"name": name, "shared_bytes": compiled.metadata.shared, "loads": global_loads(compiled.asm["ptx"])}
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability × 10 (default 90, Hopper)")
    args = parser.parse_args(argv)
    for row in compile_all(args.arch):
        loads = ", ".join(f"{n} {kind}" for kind, n in row["loads"].items())
        print(
            f"{row['name']:28s} compiled for sm_{args.arch}, {row['shared_bytes']:6d} bytes of shared memory; {loads}"
        )


if __name__ == "__main__":
    main()
