"""Hadamard rotation kernel (ssmq.ops.hadamard.hadamard_transform), optionally fused with quantization.

H_n = (S_{2^k} kron B_m) / sqrt(n) factors further as S_P kron B' with P = 2^j <= 128 and
B' = S_{2^k / P} kron B_m (Kronecker products are associative, and Sylvester matrices are Kronecker
powers of S_2). A row x of length n, seen as a (P, |B'|) matrix X[a, b] = x[a |B'| + b], rotates to
    Z = S_P X B'^T / sqrt(n)
two small matrix products per row on the tensor cores (|B'| padded with zeros to a power of two). A
program computes PB of the P output rows of Z (all of them for prefill; for decoding's few rows the
row is split over P / 16 programs, so that one SM does not do it alone).
With fp16 input the first product is exact (+-1 times fp16, fp32 accumulation); fp32 operands use
Triton's tf32x3 (three tf32 products), accurate to about fp32. The order of the two factors and the
summation order differ from the reference's butterfly, so results agree to fp32 rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ssmq.ops.hadamard import _base, _sylvester, supported_hadamard_size, check_hadamard_size
from ssmq.ops.triton.common import PER_ROW, flat_scale, load_scale, next_pow2, quantize_rn, scale_mode

MAX_P = 128
SPLIT_ROWS = 64  # up to this many rows (decoding), each row is split over P / 16 programs


@triton.jit
def _hadamard_kernel(x_ptr, s_ptr, bt_ptr, out_ptr, os_ptr, stride_x, inv_sqrt_n, P: tl.constexpr,
                     PB: tl.constexpr, MB: tl.constexpr, MP: tl.constexpr, HALF_IN: tl.constexpr,
                     OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, P)
    a_out = tl.program_id(1) * PB + tl.arange(0, PB)
    c = tl.arange(0, MP)
    x = tl.load(x_ptr + row * stride_x + a[:, None] * MB + c[None, :], mask=(c < MB)[None, :], other=0.0)
    s = tl.load(s_ptr + a_out[:, None] * P + a[None, :])
    inside = (c < MB)[None, :] & (a_out < P)[:, None]
    offs = a_out[:, None] * MB + c[None, :]
    if HALF_IN:
        y = tl.dot(s.to(tl.float16), x.to(tl.float16), out_dtype=tl.float32)
    else:
        y = tl.dot(s, x.to(tl.float32), input_precision="tf32x3", out_dtype=tl.float32)
    bt = tl.load(bt_ptr + c[:, None] * MP + c[None, :])
    z = tl.dot(y, bt, input_precision="tf32x3", out_dtype=tl.float32) * inv_sqrt_n
    out = out_ptr + row * (P * MB) + offs
    if OUT_INT8:
        tl.store(out, quantize_rn(z, load_scale(os_ptr, OS_MODE, row, offs, inside)), mask=inside)
    else:
        tl.store(out, z, mask=inside)


def factors(n: int) -> tuple[int, int] | None:
    """(P, |B'|) for a row of n, or None when n is too small (P < 16) or B' too wide for one tile."""
    if not supported_hadamard_size(n):
        return None
    m, p = check_hadamard_size(n)
    big = min(p, MAX_P)
    while big > 16 and n // big < 16:
        big //= 2
    if big < 16 or next_pow2(n // big) > MAX_P:
        return None
    return big, n // big


@lru_cache(maxsize=16)
def _matrices(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """S_P (P, P) and B'^T zero-padded to (MP, MP), fp32 on `device`."""
    p, mb = factors(n)
    m, _ = check_hadamard_size(n)
    base = torch.kron(_sylvester(mb // m), _base(m)).double()
    mp = max(next_pow2(mb), 16)
    bt = torch.zeros(mp, mp, dtype=torch.float64)
    bt[:mb, :mb] = base.t()
    return _sylvester(p).float().to(device), bt.float().to(device)


def hadamard(x: torch.Tensor, out_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """H_n x along the last dim in fp32 (x fp16 or fp32), or its int8 codes for out_scale (per tensor,
    per channel or per row). None when n or the scale layout is one the kernel does not take."""
    n = x.shape[-1]
    split = factors(n)
    mode = None if out_scale is None else scale_mode(out_scale, x.shape)
    if split is None or x.dtype not in (torch.float16, torch.float32) or (out_scale is not None and mode is None):
        return None
    p, mb = split
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, device=x.device, dtype=torch.int8 if out_scale is not None else torch.float32)
    if rows == 0:
        return out
    s, bt = _matrices(n, x.device)
    os_ = flat_scale(out_scale, x.device) if out_scale is not None else s
    pb = p if rows > SPLIT_ROWS else 16
    mp = bt.shape[0]
    _hadamard_kernel[(rows, p // pb)](x2, s, bt, out, os_, x2.stride(0), 1.0 / n ** 0.5, P=p, PB=pb, MB=mb, MP=mp,
                                      HALF_IN=x.dtype == torch.float16, OUT_INT8=out_scale is not None,
                                      OS_MODE=mode if mode is not None else PER_ROW,
                                      num_warps=8 if pb * mp >= 4096 else 4)
    return out
