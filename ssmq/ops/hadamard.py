"""Orthonormal Hadamard rotations for sizes n = m * 2^k, m in {1, 12, 40} (768, 1536, 2560, 5120, ...).

The matrix is fixed exactly, so a rotation fused into a stored weight and the one applied online agree:

    H_n = (S_{2^k} kron B_m) / sqrt(n)

S_{2^k} is Sylvester's matrix (S_1 = [1], S_2j = [[S_j, S_j], [S_j, -S_j]]; entry (i, j) is
(-1)^popcount(i & j)). B_1 = [1]; B_12 is Paley's construction I for q = 11; B_40 = S_2 kron P_20 with
P_20 Paley's construction I for q = 19. Paley I (q prime, q = 3 mod 4) is I + [[0, 1^T], [-1, Q]] with
the Jacobsthal matrix Q[i, j] = legendre(j - i mod q). B_12 and B_40 are not symmetric, so H^T != H.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ssmq.errors import SsmqError

BASE_ORDERS = (40, 12, 1)
PALEY_PRIME = {12: 11, 20: 19}


def _factor(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and m in BASE_ORDERS, or None."""
    for m in BASE_ORDERS:
        if n >= m and n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def supported_hadamard_size(n: int) -> bool:
    """True when n = 2^k, 12 * 2^k or 40 * 2^k (k >= 0)."""
    return n >= 1 and _factor(n) is not None


def check_hadamard_size(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k; SsmqError stating the rule when n is not a supported size."""
    factors = _factor(n) if n >= 1 else None
    if factors is None:
        raise SsmqError(f"no Hadamard rotation of size {n}: ssmq supports n = 2^k, 12*2^k or 40*2^k "
                        f"(e.g. 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192)")
    return factors


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q = 3 mod 4 (int64 +-1)."""
    squares = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)])
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, chi[diff]
    return torch.eye(q + 1, dtype=torch.int64) + s


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order p = 2^k (int64 +-1)."""
    idx = torch.arange(p)
    bits = (idx[:, None] & idx[None, :]).to(torch.int64)
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits >>= 1
    return 1 - 2 * parity


@lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor:
    """The unnormalised base matrix B_m (int64 +-1) on the CPU."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    if m == 12:
        return _paley1(PALEY_PRIME[12])
    return torch.kron(_sylvester(2), _paley1(PALEY_PRIME[20]))


@lru_cache(maxsize=4)
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The dense orthonormal H_n (cached: do not modify it in place). Meant for tests and small n;
    hadamard_transform applies H_n without building it."""
    m, p = check_hadamard_size(n)
    signs = torch.kron(_sylvester(p).to(dtype), _base(m).to(dtype))
    return (signs * (1.0 / math.sqrt(n))).to(device)


def _fwht_rows(x: torch.Tensor) -> torch.Tensor:
    """Apply S_p (unnormalised) along dim -2 of x (..., p, m) by the fast butterfly."""
    *lead, p, m = x.shape
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h, m)
        a, b = y.select(-3, 0), y.select(-3, 1)
        x = torch.stack((a + b, a - b), dim=-3).reshape(*lead, p, m)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """y = H_n x along the last dim (n = x.shape[-1]), i.e. x @ H_n^T; computed and returned in fp32
    (fp64 for fp64 input). The 2^k factor uses the fast Walsh-Hadamard butterfly, the base m x m
    matrix a small matmul, and 1 / sqrt(n) is applied last."""
    n = x.shape[-1]
    m, p = check_hadamard_size(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(work).reshape(*x.shape[:-1], p, m)
    if m > 1:
        xs = xs @ _base(m).to(dtype=work, device=x.device).t()
    return _fwht_rows(xs).reshape(x.shape) * (1.0 / math.sqrt(n))


def rotate_weight_input(weight: torch.Tensor) -> torch.Tensor:
    """W' = W H_n^T for a linear weight W (out, n), so that W' (H_n y) = W y: the offline half of a
    rotation whose online half is hadamard_transform on the layer's input. Computed in fp64, returned
    in W's dtype."""
    return hadamard_transform(weight.double()).to(weight.dtype)
