"""Packed ternary layout, torch reference kernels, and the Triton kernel (interpreter on CPU)."""

import pytest
import torch

from twla.kernels.bench import random_packed
from twla.kernels.reference import (
    dequantize,
    group_accumulators,
    matmul_a16,
    matmul_int,
    pack_codes,
    pack_ternary,
    quantize_activations,
    unpack_codes,
)
from twla.kernels.triton_ternary import ternary_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_weight(N, K, group_size, seed=0):
    """The benchmark's random packed weight, with its codes T and α, μ as (N, G)."""
    w = random_packed(N, K, group_size, seed=seed)
    return unpack_codes(w.packed, K), w.alpha.T, w.mu.T, w


@pytest.mark.parametrize("K", [1, 4, 13, 128, 130])
def test_pack_roundtrip_and_zero_padding(K):
    T = (torch.randint(0, 3, (7, K)) - 1).to(torch.int8)
    packed = pack_codes(T)
    assert packed.shape == (-(-K // 4), 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, K), T)
    padded = unpack_codes(packed, packed.shape[0] * 4)
    assert (padded[:, K:] == 0).all()


def test_dequantize_matches_dense_grid():
    T, alpha, mu, w = random_weight(9, 200, 64)
    group = torch.arange(200) // 64
    assert torch.allclose(dequantize(w), alpha[:, group] * T + mu[:, group])
    x = torch.randn(3, 200)
    assert torch.allclose(matmul_a16(x, w), x @ dequantize(w).T, atol=1e-5)


def test_reference_int_path_is_exact_integer_matmul():
    T, _, _, w = random_weight(11, 256, 128)
    q = torch.randint(-7, 8, (5, 256), dtype=torch.int8)
    A, R = group_accumulators(q, w)
    c = (T.to(torch.int32) + 1).T
    assert torch.equal(A.sum(0), q.to(torch.int32) @ c)
    assert torch.equal(R.sum(0), q.to(torch.int32).sum(1))


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (5, 40, 300), (17, 70, 256), (33, 16, 130)])
def test_triton_a16_matches_reference(M, N, K):
    _, _, _, w = random_weight(N, K, 128, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    y = ternary_matmul(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert torch.allclose(y, matmul_a16(x, w), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (5, 40, 300), (17, 70, 384)])
def test_triton_int8_accumulators_are_bit_exact(M, N, K):
    """With α = μ = 1 and s = 1 the output is exactly Σ_k q_mk c_kn (integers below 2^24)."""
    T, alpha, _, _ = random_weight(N, K, 128, seed=M)
    w = pack_ternary(T, torch.ones_like(alpha), torch.ones_like(alpha), 128)
    q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    y = ternary_matmul(q.to(DEVICE), w.to(DEVICE), torch.ones(M, device=DEVICE)).cpu()
    exact = q.to(torch.int32) @ (T.to(torch.int32) + 1).T
    assert torch.equal(y, exact.float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_int_path_matches_reference(bits):
    _, _, _, w = random_weight(48, 300, 128, seed=bits)
    q, s = quantize_activations(torch.randn(6, 300, generator=torch.Generator().manual_seed(3)), bits)
    y = ternary_matmul(q.to(DEVICE), w.to(DEVICE), s.to(DEVICE)).cpu()
    assert torch.allclose(y, matmul_int(q, s, w), atol=1e-4, rtol=1e-4)


def test_split_k_is_deterministic_and_equal():
    _, _, _, w = random_weight(32, 512, 128)
    q, s = quantize_activations(torch.randn(1, 512), 4)
    q, s, w = q.to(DEVICE), s.to(DEVICE), w.to(DEVICE)
    one = ternary_matmul(q, w, s, split=1)
    split = ternary_matmul(q, w, s, split=4)
    assert torch.allclose(one, split, atol=1e-4) and torch.equal(split, ternary_matmul(q, w, s, split=4))


def test_kernel_input_errors():
    _, _, _, w = random_weight(8, 128, 64)
    with pytest.raises(ValueError, match="multiple of 128"):
        ternary_matmul(torch.randn(2, 128), w)
    _, _, _, w = random_weight(8, 128, 128)
    with pytest.raises(ValueError, match="features"):
        ternary_matmul(torch.randn(2, 100), w)
    with pytest.raises(ValueError, match="per-token scale"):
        ternary_matmul(torch.zeros(2, 128, dtype=torch.int8), w)
    with pytest.raises(ValueError, match="2..8 bits"):
        quantize_activations(torch.randn(2, 8), 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp16_at_7b_shape():
    _, _, _, w = random_weight(4096, 4096, 128)
    x = torch.randn(16, 4096, dtype=torch.float16)
    y = ternary_matmul(x.cuda(), w.to("cuda"))
    assert y.dtype == torch.float16
    assert torch.allclose(y.float().cpu(), matmul_a16(x.float(), w), atol=5e-2, rtol=1e-2)
