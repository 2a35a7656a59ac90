"""Hadamard rotations: orthonormality, the fast transform against the dense matrix, weight fusion."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmq.errors import SsmqError
from ssmq.ops.hadamard import (check_hadamard_size, hadamard_matrix, hadamard_transform, rotate_weight_input,
                               supported_hadamard_size)

SIZES = [2, 4, 8, 12, 24, 40, 80, 768, 1536, 2560]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_orthonormal_with_plus_minus_one_entries(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    assert torch.equal((h * math.sqrt(n)).round().abs(), torch.ones(n, n))
    torch.testing.assert_close(h @ h.t(), torch.eye(n), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_dense_matrix(n):
    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(n))
    h = hadamard_matrix(n, torch.float64)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ h.t(), rtol=1e-5, atol=1e-5)


def test_hand_cases():
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(hadamard_transform(torch.tensor([1.0, 0.0])), torch.tensor([r, r]))
    torch.testing.assert_close(hadamard_transform(torch.tensor([1.0, 1.0, 1.0, 1.0])), torch.tensor([2.0, 0, 0, 0]))
    # Sylvester's and Paley's first rows are all ones and every other row sums to zero (it is orthogonal to
    # the first), so the all-ones vector maps to sqrt(n) e_0.
    for n in (12, 40, 768, 5120):
        expected = torch.zeros(n)
        expected[0] = math.sqrt(n)
        torch.testing.assert_close(hadamard_transform(torch.ones(n)), expected, rtol=1e-5, atol=1e-4)


def signs(n: int, row: int) -> list[int]:
    return (hadamard_matrix(n, torch.float64)[row] * math.sqrt(n)).round().long().tolist()


def test_the_matrix_is_pinned_exactly():
    # Paley I, q = 11: row 1 = [-1, 1, chi(1), ..., chi(10)], quadratic residues mod 11 = {1, 3, 4, 5, 9}
    b12 = [-1, 1, 1, -1, 1, 1, 1, -1, -1, -1, 1, -1]
    # Paley I, q = 19: row 1 = [-1, 1, chi(1), ..., chi(18)], residues mod 19 = {1, 4, 5, 6, 7, 9, 11, 16, 17}
    p20 = [-1, 1, 1, -1, -1, 1, 1, 1, 1, -1, 1, -1, 1, -1, -1, -1, -1, 1, 1, -1]
    assert signs(12, 0) == [1] * 12 and signs(12, 1) == b12
    assert hadamard_matrix(12)[1, 0] != hadamard_matrix(12)[0, 1]  # not symmetric
    # the 2^k factor is the outer one of the Kronecker product: H_24 = S_2 kron B_12
    assert signs(24, 1) == b12 + b12 and signs(24, 13) == b12 + [-v for v in b12]
    assert signs(40, 1) == p20 + p20 and signs(40, 21) == p20 + [-v for v in p20]
    neg = [-v for v in p20]
    assert signs(80, 21) == p20 + neg + p20 + neg  # S_4 row 1 = [1, -1, 1, -1]
    assert signs(8, 5) == [1, -1, 1, -1, -1, 1, -1, 1]  # (-1)^popcount(5 & j)


@pytest.mark.parametrize("n", [0, 3, 20, 100, 120, 6144 + 1])
def test_unsupported_sizes_are_refused_with_the_rule(n):
    assert not supported_hadamard_size(n)
    with pytest.raises(SsmqError, match=r"2\^k, 12\*2\^k or 40\*2\^k.*1536.*5120"):
        hadamard_transform(torch.zeros(2, n))
    with pytest.raises(SsmqError):
        hadamard_matrix(n)


def test_supported_sizes():
    for n in (1, 2, 64, 768, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 10240):
        assert supported_hadamard_size(n)
    assert check_hadamard_size(5120) == (40, 128) and check_hadamard_size(1536) == (12, 128)
    assert check_hadamard_size(4096) == (1, 4096)


@pytest.mark.parametrize("n", [1536, 5120])
def test_rotated_weight_cancels_the_online_rotation(n):
    g = torch.Generator().manual_seed(7)
    w, b, x = torch.randn(16, n, generator=g), torch.randn(16, generator=g), torch.randn(4, n, generator=g)
    rotated = rotate_weight_input(w)
    assert rotated.dtype == w.dtype
    torch.testing.assert_close(F.linear(hadamard_transform(x), rotated, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    # and the rotation preserves norms
    torch.testing.assert_close(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_online_rotation_keeps_the_activation_dtype():
    """The float rotation before out_proj (W4A16 models) computes in fp32 and returns y's dtype, so an fp16
    model's out_proj stays an fp16 matmul; fp32 activations are unchanged."""
    from ssmq.quant.transforms import HadamardRotation

    y = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0))
    rotation = HadamardRotation(40)
    assert torch.equal(rotation(y), hadamard_transform(y))
    half = rotation(y.half())
    assert half.dtype == torch.float16 and torch.equal(half, hadamard_transform(y.half()).half())
