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

Mamba2's path into out_proj (gated_norm_hadamard) can run its gated RMSNorm in the same kernel: each
program loads the whole row of the scan output y and the gate z, normalises it group by group (a group is
a power of two of whole tile rows) and rotates the result, instead of the norm kernel writing the row out
for this one to read back. That pays for many rows (prefill) and for a row of one norm group; a decoding
step's few rows of several groups take the two kernels (FUSED_NORM_MIN_ROWS, FUSED_NORM_MAX_GROUPS).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ssmq.ops.hadamard import _base, _sylvester, supported_hadamard_size, check_hadamard_size
from ssmq.ops.triton.common import (PER_CHANNEL, PER_ROW, PER_TENSOR, flat_scale, load_scale, next_pow2,
                                    prefetch_options, prefetch_span, quantize_rn, scale_mode, silu, span_lines,
                                    wait_for_inputs)

MAX_P = 128
_FLOATS = (torch.float16, torch.float32)
SPLIT_ROWS = 64  # up to this many rows (decoding), each row is split over P / 16 programs
FUSED_NORM_MIN_ROWS = SPLIT_ROWS + 1
FUSED_NORM_MAX_GROUPS = 1
"""gated_norm_hadamard fuses the norm from FUSED_NORM_MIN_ROWS rows on (prefill), and for fewer rows
(decoding) only when a row has at most FUSED_NORM_MAX_GROUPS norm groups. gpu_check m2time on an H200, batch
1, norm + rotation + quantization: mamba2-8b (8 groups) 6.7 us fused against 4.8 us for the norm kernel
and the rotation kernel (the fused kernel's programs each normalise the whole row before their share of
the rotation, while the norm kernel runs a program per group); mamba2-2.7b (one group of 5120, which the
norm kernel normalises in a single program) 6.8 us fused against 7.5 us apart."""


@triton.jit
def _gated_norm_tile(y, row, offs, mask, z_ptr, zs_ptr, w_ptr, stride_z, eps, GROUP: tl.constexpr,
                     P: tl.constexpr, NG: tl.constexpr, GATE_Q: tl.constexpr, ZS_MODE: tl.constexpr):
    """Mamba2's gated RMSNorm of a whole row held as a (P, MP) tile (element a * MB + c at [a, c], masked
    lanes 0): h = y * silu(gate), each group of GROUP channels (P / NG tile rows) normalised alone, times
    the weight, in the weight's dtype; computed as ssmq.ops.triton.norm's kernel computes it."""
    g = tl.load(z_ptr + row * stride_z + offs, mask=mask, other=0).to(tl.float32)
    if GATE_Q:
        g = g * load_scale(zs_ptr, ZS_MODE, row, offs, mask)
    h = y.to(tl.float32) * silu(g)
    sums = tl.sum(tl.reshape(tl.sum(h * h, axis=1), (NG, P // NG)), axis=1)
    rstd = tl.reshape(tl.broadcast_to(tl.rsqrt(sums / GROUP + eps)[:, None], (NG, P // NG)), (P,))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    v = w.to(tl.float32) * (h * rstd[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32)
    return v.to(w_ptr.dtype.element_ty)


@triton.jit
def _hadamard_kernel(x_ptr, s_ptr, bt_ptr, out_ptr, os_ptr, stride_x, inv_sqrt_n, z_ptr, zs_ptr, w_ptr, stride_z,
                     eps, P: tl.constexpr, PB: tl.constexpr, MB: tl.constexpr, MP: tl.constexpr,
                     HALF_IN: tl.constexpr, OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, NORM: tl.constexpr,
                     GROUP: tl.constexpr, NG: tl.constexpr, GATE_Q: tl.constexpr, ZS_MODE: tl.constexpr,
                     PDL: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr):
    """The rotation (and quantization) of one row's PB output rows; NORM: the row is first the gated norm
    of x (y) with z and w (every program of the row computes it: the row is small). PREFETCH: the
    matrices, the per-channel scales and the norm's weight (shared by the rows), while the kernel before
    finishes."""
    row = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, P)
    a_out = tl.program_id(1) * PB + tl.arange(0, PB)
    c = tl.arange(0, MP)
    in_offs = a[:, None] * MB + c[None, :]
    in_mask = (c < MB)[None, :] & (a < P)[:, None]
    if PREFETCH:
        if row == 0:  # asked for by the first row's programs only: every row reads the same
            a0 = tl.program_id(1) * PB
            prefetch_span(s_ptr + a0 * P, PB * P * 4, LINES)
            prefetch_span(bt_ptr, MP * MP * 4, LINES)
            if OUT_INT8 and OS_MODE == 1:
                prefetch_span(os_ptr + a0 * MB, PB * MB * 4, LINES)
            if NORM:
                prefetch_span(w_ptr, P * MB * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), LINES)
                if GATE_Q and ZS_MODE == 1:
                    prefetch_span(zs_ptr, P * MB * 4, LINES)
    wait_for_inputs(PDL)
    s = tl.load(s_ptr + a_out[:, None] * P + a[None, :])
    bt = tl.load(bt_ptr + c[:, None] * MP + c[None, :])
    x = tl.load(x_ptr + row * stride_x + in_offs, mask=in_mask, other=0.0)
    if NORM:
        x = _gated_norm_tile(x, row, in_offs, in_mask, z_ptr, zs_ptr, w_ptr, stride_z, eps, GROUP, P, NG, GATE_Q,
                             ZS_MODE)
    inside = (c < MB)[None, :] & (a_out < P)[:, None]
    offs = a_out[:, None] * MB + c[None, :]
    if HALF_IN:
        y = tl.dot(s.to(tl.float16), x.to(tl.float16), out_dtype=tl.float32)
    else:
        y = tl.dot(s, x.to(tl.float32), input_precision="tf32x3", out_dtype=tl.float32)
    z = tl.dot(y, bt, input_precision="tf32x3", out_dtype=tl.float32) * inv_sqrt_n
    out = out_ptr + row * (P * MB) + offs
    if OUT_INT8:
        tl.store(out, quantize_rn(z, load_scale(os_ptr, OS_MODE, row, offs, inside)), mask=inside)
    else:
        tl.store(out, z, mask=inside)


@lru_cache(maxsize=64)
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
    return _rotate(x, out_scale, None)


def gated_norm_hadamard(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int,
                        gate_scale: torch.Tensor | None, out_scale: torch.Tensor,
                        config: dict[str, int] | None = None) -> torch.Tensor | None:
    """int8 codes of H_n gated_rms_norm(y, gate, weight) for out_scale, in one kernel (Mamba2's path into
    out_proj): the norm as ssmq.ops.triton.norm.gated_rms_norm computes it (int8 gate codes with
    `gate_scale`), in the weight's dtype, then the rotation of that value. None when the shapes or layouts
    are ones the kernel does not take: a group must be whole rows of the rotation's (P, |B'|) tile, a
    power of two of them; and None for decoding's few rows of several groups, where the norm's and the
    rotation's own kernels are faster (FUSED_NORM_MIN_ROWS, FUSED_NORM_MAX_GROUPS). `config` overrides the
    output rows per program (PB) and num_warps."""
    n = y.shape[-1]
    split = factors(n)
    if (split is None or gate.shape != y.shape or weight.shape != (n,) or weight.dtype not in _FLOATS
            or group_size < 1 or n % group_size or group_size % split[1]):
        return None
    if y.numel() // n < FUSED_NORM_MIN_ROWS and n // group_size > FUSED_NORM_MAX_GROUPS:
        return None
    rows_per_group = group_size // split[1]
    gs_mode = PER_TENSOR if gate_scale is None else scale_mode(gate_scale, gate.shape)
    if rows_per_group & (rows_per_group - 1) or split[0] % rows_per_group or gs_mode not in (PER_TENSOR,
                                                                                            PER_CHANNEL):
        return None
    g2 = gate.reshape(-1, n)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    gs = flat_scale(gate_scale, y.device) if gate_scale is not None else weight
    return _rotate(y, out_scale, dict(z=g2, zs=gs, w=weight.contiguous(), eps=eps, group=group_size,
                                      ng=split[0] // rows_per_group, gate_q=gate_scale is not None, zs_mode=gs_mode),
                   half_in=weight.dtype == torch.float16, config=config)


def _rotate(x: torch.Tensor, out_scale: torch.Tensor | None, norm: dict | None,
            half_in: bool | None = None, config: dict[str, int] | None = None) -> torch.Tensor | None:
    n = x.shape[-1]
    split = factors(n)
    mode = None if out_scale is None else scale_mode(out_scale, x.shape)
    if split is None or x.dtype not in _FLOATS or (out_scale is not None and mode is None):
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
    cfg = config or {}
    pb = cfg.get("PB", p if rows > SPLIT_ROWS else 16)
    mp = bt.shape[0]
    nm = norm or dict(z=s, zs=s, w=s, eps=0.0, group=1, ng=1, gate_q=False, zs_mode=PER_TENSOR)
    _hadamard_kernel[(rows, p // pb)](
        x2, s, bt, out, os_, x2.stride(0), 1.0 / n ** 0.5, nm["z"], nm["zs"], nm["w"],
        nm["z"].stride(0) if norm else 0, nm["eps"], P=p, PB=pb, MB=mb, MP=mp,
        HALF_IN=x.dtype == torch.float16 if half_in is None else half_in, OUT_INT8=out_scale is not None,
        OS_MODE=mode if mode is not None else PER_ROW, NORM=norm is not None, GROUP=nm["group"], NG=nm["ng"],
        GATE_Q=nm["gate_q"], ZS_MODE=nm["zs_mode"],
        num_warps=cfg.get("num_warps", 8 if norm or pb * mp >= 4096 else 4),
        LINES=span_lines(4 * max(pb * p, mp * mp, n if norm else 0)), enable_fp_fusion=False,
        **prefetch_options(x.device))
    return out
