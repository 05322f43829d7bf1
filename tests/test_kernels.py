"""Packed ternary layout, torch reference kernels, and the Triton kernels (interpreter on CPU)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from twla.kernels.packing import dequantize, pack_codes, pack_ternary, random_packed, unpack_codes
from twla.kernels.reference import (
    QuantizedActivations,
    group_accumulator,
    group_sums,
    matmul_a16,
    matmul_int,
    quantize_activations,
    weight_sums,
)
from twla.kernels.triton_quant import quantize_activations_triton
from twla.kernels.triton_ternary import ternary_matmul
from twla.kernels.trits import pack_trits, unpack_trits
from twla.kernels.uniform import fake_quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_weight(N, K, group_size, seed=0):
    """The benchmark's random packed weight, with its codes T and α, μ as (N, G)."""
    w = random_packed(N, K, group_size=group_size, seed=seed)
    return unpack_codes(w.packed, K, group_size), w.alpha.T, w.mu.T, w


def activations(M, K, seed=0):
    """Per-token activations with an outlier column, like LLM inputs."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    x[:, K // 3] *= 20
    return x


def same(a, b):
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("q", "scale", "zero", "rowsum"))


@pytest.mark.parametrize("K,group_size", [(1, 4), (13, 8), (128, 128), (130, 128), (576, 128), (200, 64)])
def test_pack_roundtrip_and_the_grouped_plane_layout(K, group_size):
    """Plane j of local row l of group g holds column g·group_size + j·q_g + l (q_g = ⌈S_g/4⌉ rows
    of a group of S_g columns); the rest of a short last group is code 1 (t = 0)."""
    T = (torch.randint(0, 3, (7, K)) - 1).to(torch.int8)
    packed = pack_codes(T, group_size)
    assert packed.shape == (-(-K // 4), 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, K, group_size), T)
    row = 0
    for start in range(0, K, group_size):
        size = min(group_size, K - start)
        q = -(-size // 4)
        for j in range(4):
            for local in range(q):
                t = ((packed[row + local] >> (2 * j)) & 3).to(torch.int8) - 1
                column = j * q + local
                assert torch.equal(t, T[:, start + column] if column < size else torch.zeros(7, dtype=torch.int8))
        row += q


@pytest.mark.parametrize("K", [1, 4, 5, 13, 576])
def test_base_3_storage_round_trips_at_1_6_bits(K):
    """Byte j of a row holds columns 5j..5j+4 as Σ_i c_i·3^i (c = t + 1), padded with code 1;
    bytes above 242 are refused."""
    T = (torch.randint(0, 3, (7, K)) - 1).to(torch.int8)
    T[0] = 1  # every byte of row 0 is 242 but a padded last one
    packed = pack_trits(T)
    assert packed.shape == (7, -(-K // 5)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_trits(packed, K), T)
    c = torch.nn.functional.pad(T.long() + 1, (0, -K % 5), value=1).view(7, -1, 5)
    assert torch.equal(packed.long(), (c * torch.tensor([1, 3, 9, 27, 81])).sum(-1))
    assert int(packed.max()) <= 242 and (K % 5 or int(packed[0].min()) == 242)
    packed[3, 0] = 243
    with pytest.raises(ValueError, match="corrupt"):
        unpack_trits(packed, K)
    with pytest.raises(ValueError, match=r"uint8 \(N, "):
        unpack_trits(packed[:, :-1] if packed.shape[1] > 1 else packed.int(), K)


def test_dequantize_matches_dense_grid():
    T, alpha, mu, w = random_weight(9, 200, 64)
    group = torch.arange(200) // 64
    assert torch.allclose(dequantize(w), alpha[:, group] * T + mu[:, group])
    x = torch.randn(3, 200)
    assert torch.allclose(matmul_a16(x, w), x @ dequantize(w).T, atol=1e-5)
    assert torch.allclose(weight_sums(w), dequantize(w).sum(1), atol=1e-4)


def test_reference_int_path_is_exact_integer_matmul():
    T, _, _, w = random_weight(11, 256, 128)
    q = torch.randint(-7, 8, (5, 256), dtype=torch.int8)
    A = sum(group_accumulator(q, w, g) for g in range(w.groups))
    assert A.dtype == torch.int32 and torch.equal(A, q.to(torch.int32) @ (T.to(torch.int32) + 1).T)
    assert torch.equal(group_sums(q, 128).sum(1), q.to(torch.int32).sum(1))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_activations_equal_fake_quantization(bits, symmetric):
    """x̂ = s(q − z) with int8-held q is exactly the fake-quantized activation, and the
    integer path equals x̂ Ŵᵀ."""
    x = activations(6, 300, seed=bits)
    a = quantize_activations(x, bits, clip=0.9, symmetric=symmetric, group_size=128)
    assert a.q.dtype == torch.int8 and a.rowsum.shape == (6, 3)
    assert torch.equal(a.dequantize(), fake_quantize(x, bits, clip=0.9, symmetric=symmetric))
    _, _, _, w = random_weight(40, 300, 128, seed=bits)
    y = matmul_int(a, w)
    exact = a.dequantize().double() @ dequantize(w).double().T
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-4 * exact.abs().max())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [128, 64])
def test_triton_quantization_kernel_is_bit_exact(bits, symmetric, group):
    x = activations(5, 300, seed=bits)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    for p in (None, perm):
        want = quantize_activations(x, bits, clip=0.85, symmetric=symmetric, group_size=group, perm=p)
        got = quantize_activations_triton(
            x.to(DEVICE),
            bits,
            clip=0.85,
            symmetric=symmetric,
            group_size=group,
            perm=None if p is None else p.to(DEVICE),
        )
        assert same(want, got.to("cpu"))


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (5, 40, 300), (17, 70, 256), (33, 16, 130)])
@pytest.mark.parametrize("gemv", [True, False])
def test_triton_a16_matches_reference(M, N, K, gemv):
    _, _, _, w = random_weight(N, K, 128, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    y = ternary_matmul(x.to(DEVICE), w.to(DEVICE), gemv=gemv).cpu()
    assert torch.allclose(y, matmul_a16(x, w), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (5, 40, 300), (17, 70, 384)])
@pytest.mark.parametrize("gemv", [True, False])
def test_triton_int8_accumulators_are_bit_exact(M, N, K, gemv):
    """With α = μ = 1, s = 1 and z = 0 the output is exactly Σ_k q_mk c_kn (integers below 2^24)."""
    T, alpha, _, _ = random_weight(N, K, 128, seed=M)
    w = pack_ternary(T, torch.ones_like(alpha), torch.ones_like(alpha), group_size=128)
    q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    a = QuantizedActivations(q, torch.ones(M), torch.zeros(M), group_sums(q, 128), symmetric=True)
    y = ternary_matmul(a.to(DEVICE), w.to(DEVICE), gemv=gemv).cpu()
    exact = q.to(torch.int32) @ (T.to(torch.int32) + 1).T
    assert torch.equal(y, exact.float())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("group", [128, 64])
def test_triton_int_path_matches_reference(bits, symmetric, M, group):
    """Odd N and K with a short last group (300 = 2·128 + 44 = 4·64 + 44); GEMV for M = 1, GEMM for M = 6."""
    _, _, _, w = random_weight(45, 300, group, seed=bits)
    a = quantize_activations(activations(M, 300, seed=3), bits, clip=1.0, symmetric=symmetric, group_size=group)
    y = ternary_matmul(a.to(DEVICE), w.to(DEVICE), wsum=weight_sums(w).to(DEVICE)).cpu()
    ref = matmul_int(a, w)
    assert torch.allclose(y, ref, atol=1e-5 * ref.abs().max(), rtol=1e-5)


@pytest.mark.parametrize("gemv", [True, False])
def test_split_k_is_deterministic_and_equal(gemv):
    _, _, _, w = random_weight(32, 512, 128)
    a = quantize_activations(torch.randn(2, 512), 4).to(DEVICE)
    w, wsum = w.to(DEVICE), weight_sums(w).to(DEVICE)
    one = ternary_matmul(a, w, wsum=wsum, split=1, gemv=gemv)
    split = ternary_matmul(a, w, wsum=wsum, split=4, gemv=gemv)
    assert torch.allclose(one, split, atol=1e-4 * one.abs().max())
    assert torch.equal(split, ternary_matmul(a, w, wsum=wsum, split=4, gemv=gemv))


@pytest.mark.parametrize("gemv", [True, False])
def test_triton_a16_groups_of_64(gemv):
    _, _, _, w = random_weight(40, 300, 64, seed=5)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    y = ternary_matmul(x.to(DEVICE), w.to(DEVICE), gemv=gemv).cpu()
    assert torch.allclose(y, matmul_a16(x, w), atol=1e-3, rtol=1e-3)


def test_kernel_input_errors():
    _, _, _, w = random_weight(8, 128, 32)
    with pytest.raises(ValueError, match="multiple of 64"):
        ternary_matmul(torch.randn(2, 128), w)
    _, _, _, w = random_weight(8, 128, 128)
    with pytest.raises(ValueError, match="features"):
        ternary_matmul(torch.randn(2, 100), w)
    with pytest.raises(ValueError, match="weight sums"):
        ternary_matmul(quantize_activations(torch.randn(2, 128), 4), w)
    with pytest.raises(ValueError, match="2..8 bits"):
        quantize_activations(torch.randn(2, 8), 16)
    with pytest.raises(ValueError, match="2..8 bits"):
        quantize_activations_triton(torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_activations_triton(torch.randn(2, 8), 4, group_size=32)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 1), torch.ones(2, 1), group_size=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_fp16_and_int8_at_7b_shape(M):
    _, _, _, w = random_weight(4096, 4096, 128)
    x = torch.randn(M, 4096, dtype=torch.float16)
    y = ternary_matmul(x.cuda(), w.to("cuda"))
    assert y.dtype == torch.float16
    assert torch.allclose(y.float().cpu(), matmul_a16(x.float(), w), atol=5e-2, rtol=1e-2)
    a = quantize_activations_triton(x.cuda(), 4)
    assert same(quantize_activations(x, 4), a.to("cpu"))
    y = ternary_matmul(a, w.to("cuda"), wsum=weight_sums(w).cuda()).cpu()
    ref = matmul_int(quantize_activations(x, 4), w)
    assert torch.allclose(y, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_variant_compiles_for_the_gpu(arch, tmp_path):
    """The interpreter does not compile: lower every variant to a cubin (Ampere, Hopper) without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "twla.kernels.aot", "--arch", str(arch)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 12 and all(f"compiled for sm_{arch}" in line for line in lines)
    # the grouped plane layout: every activation tile of the GEMM is copied 16 bytes at a time (the
    # strided layout of format 3 read it with 64 scalar loads per plane step); the GEMV's codes too
    for line in lines:
        loads = dict(re.findall(r"(\d+) (vector|async 16 B|scalar 1-2 B)", line)[i][::-1] for i in range(3))
        if line.startswith("gemm"):
            assert int(loads["async 16 B"]) > 0 and loads["scalar 1-2 B"] == "0", line
        if line.startswith("gemv"):
            assert int(loads["vector"]) > 0, line


def test_kernel_package_imports_nothing_else_of_twla():
    """``twla.kernels`` is a leaf: every kernel module imports with the rest of twla blocked."""
    code = """
import importlib, importlib.abc, pkgutil, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        # twla/__init__ registers the checkpoint format with transformers; that module imports no twla
        if name.startswith("twla.") and not name.startswith(("twla.kernels", "twla.deploy.hf_quantizer")):
            raise ImportError(f"twla.kernels imported {name}")
        return None

sys.meta_path.insert(0, Block())
import twla.kernels
names = sorted(m.name for m in pkgutil.iter_modules(twla.kernels.__path__))
for name in names:
    importlib.import_module(f"twla.kernels.{name}")
print(" ".join(names))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    modules = set(result.stdout.split())
    assert {"packing", "reference", "uniform", "dispatch", "triton_ternary", "triton_quant"} <= modules
