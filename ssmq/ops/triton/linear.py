"""W8A8 linear kernels (ssmq.ops.int8_linear.int8_linear) with the rescale / requantize epilogue fused.

    acc = x_q @ w_q^T                                  int32, exact (int8 products summed in int32)
    v   = fp32(acc) * (x_scale * w_scale) + bias       fp32, in this order, no fused multiply-add
    out = v in the output dtype, or quantize(v, out_scale)

Prefill (many rows) uses a tiled GEMM on the int8 tensor cores (`tl.dot` with an int32 accumulator).
Decoding (a few rows) is memory bound and too thin for tensor-core tiles: a GEMV streams each weight
row once with wide loads and sums int8 x int8 products in int32 on the CUDA cores. The kernels are
launched without fp contraction, so the epilogue rounds exactly as the reference does and int8
outputs are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton import common
from ssmq.ops.triton.common import (INTERPRETED, PER_CHANNEL, PER_ROW, PER_TENSOR, flat_scale, let_next_start,
                                    load_scale, next_pow2, pdl_options, quantize_rn, scale_mode, wait_for_inputs)

GEMV_MAX_ROWS = 4  # up to this many rows the weight-streaming GEMV beats a tensor-core tile


@triton.jit
def _epilogue(acc, rows, cols, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr,
              XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
              OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr):
    """Rescale an int32 accumulator tile at (rows, cols) and store it (float, or requantized int8); returns
    what it stored."""
    mask = (rows < M) & (cols < N)
    xs = load_scale(xs_ptr, XS_MODE, rows, cols, mask)
    ws = load_scale(ws_ptr, WS_MODE, rows, cols, mask)
    v = tl.where(mask, acc.to(tl.float32), 0.0) * (xs * ws)  # lanes past the edge stay finite
    if HAS_BIAS:
        v = v + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    ptrs = out_ptr + rows.to(tl.int64) * stride_om + cols
    if OUT_INT8:
        out = quantize_rn(v, load_scale(os_ptr, OS_MODE, rows, cols, mask))
    else:
        out = v.to(out_ptr.dtype.element_ty)
    tl.store(ptrs, out, mask=mask)
    return out


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT8: tl.constexpr,
                 OS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # programs of GROUP_M row tiles walk the columns together (L2 reuse)
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows and columns past the edge wrap around: loaded, computed, never stored
    x_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + (rn % N).to(tl.int64)[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0)
        b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _epilogue(acc, rm[:, None], rn[None, :], M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr,
              XS_MODE, WS_MODE, HAS_BIAS, OUT_INT8, OS_MODE)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT8: tl.constexpr,
                 OS_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    wait_for_inputs(PDL, False)
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        x = tl.load(x_row + kk, mask=kmask, other=0).to(tl.int32)
        w = tl.load(w_rows + kk[None, :], mask=kmask[None, :], other=0).to(tl.int32)
        acc += tl.sum(w * x[None, :], axis=1)
    let_next_start(PDL)
    _epilogue(acc, m, rn, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr,
              XS_MODE, WS_MODE, HAS_BIAS, OUT_INT8, OS_MODE)


if INTERPRETED:  # the interpreter runs no inline PTX: the same sum, by shifts
    @triton.jit
    def _dp4a(a, b, acc):
        """acc + the dot product of the four int8 lanes of a and b (int32 words)."""
        for i in tl.static_range(4):
            acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return acc
else:
    @triton.jit
    def _dp4a(a, b, acc):
        """acc + the dot product of the four int8 lanes of a and b (int32 words): one dp4a instruction."""
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _gemv_dp4a_kernel(x_ptr, w_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, K, stride_xm, stride_wn,
                      stride_om, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRELOAD: tl.constexpr, PDL: tl.constexpr):
    """The GEMV with codes read as int32 words of four and multiplied-accumulated by dp4a (exact, like the
    int32 sums of _gemv_kernel, in a quarter of the instructions). K and the row strides are multiples of
    4 and the pointers 4-byte aligned (the launcher checks); BLOCK_K counts words. PRELOAD: the first step's
    weights are loaded before the PDL wait (common.PRELOAD_WEIGHTS)."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k4 = K // 4
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + (rn % N).to(tl.int64)[:, None] * (stride_wn // 4)
    x_row = x_ptr.to(tl.pointer_type(tl.int32)) + m.to(tl.int64) * (stride_xm // 4)
    if PRELOAD:
        w0 = tl.load(w_rows + rk[None, :], mask=(rk < k4)[None, :], other=0)
    wait_for_inputs(PDL, False)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    if PRELOAD:
        x0 = tl.load(x_row + rk, mask=rk < k4, other=0)
        acc = _dp4a(w0, tl.broadcast_to(x0[None, :], (BLOCK_N, BLOCK_K)), acc)
    for k0 in range(BLOCK_K * PRELOAD, k4, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k4
        x = tl.load(x_row + kk, mask=kmask, other=0)
        w = tl.load(w_rows + kk[None, :], mask=kmask[None, :], other=0)
        acc = _dp4a(w, tl.broadcast_to(x[None, :], (BLOCK_N, BLOCK_K)), acc)
    let_next_start(PDL)
    _epilogue(tl.sum(acc, axis=1), m, rn, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr,
              XS_MODE, WS_MODE, HAS_BIAS, OUT_INT8, OS_MODE)


GEMV_TUNED: dict[tuple[int, int], dict[str, int]] = {}
"""GEMV configurations by (N, K) that replace _gemv_config's choice: filled by a tuning run on the GPU
(benchmarks/gpu_check.py, stage `tune`), for the process that ran it. DP4A=1 selects the dp4a kernel."""


def _gemm_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tile shapes by problem size: thin tiles for decode-sized M, int8 tensor-core tiles otherwise (the
    sizes that timed best on an H100 for the mamba-2.8b projections, benchmarks/gpu_check.py)."""
    if m <= 16:
        bn = 64 if triton.cdiv(n, 64) >= 128 else 32 if triton.cdiv(n, 32) >= 128 else 16
        return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=max(32, min(256, next_pow2(k))), GROUP_M=1, num_warps=4,
                    num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=max(32, min(128, next_pow2(k))), GROUP_M=1, num_warps=4,
                    num_stages=4)
    if m >= 1024 and n >= 8192:
        return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=max(32, min(128, next_pow2(k))), GROUP_M=8, num_warps=8,
                    num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=max(32, min(64, next_pow2(k))), GROUP_M=8, num_warps=4,
                num_stages=4)


def _gemv_config(n: int, k: int) -> dict[str, int]:
    """About 640 programs or more (several per SM, so enough loads are in flight to stream the weights at
    full bandwidth) with up to 8 weight rows each, and up to 4096 codes per load. Wide weights (N >= 8192:
    in_proj, lm_head) take 16 or 32 rows per program and the dp4a kernel, small K (dt_proj) 16 rows: the
    fastest bit-exact configurations of the `tune` stage of benchmarks/gpu_check.py on an H200 for the
    mamba-2.8b weights (docs/performance.md)."""
    if n >= 8192 and k % 4 == 0 and k >= 512:
        wide = n >= 32768
        return dict(BLOCK_N=32 if wide else 16, BLOCK_K=512, num_warps=8 if wide else 4, DP4A=1)
    if k <= 256 and n >= 4096:
        return dict(BLOCK_N=16, BLOCK_K=max(32, next_pow2(k)), num_warps=4)
    bn = 1
    while bn < 8 and n // (2 * bn) >= 640:
        bn *= 2
    return dict(BLOCK_N=bn, BLOCK_K=max(32, min(1024, next_pow2(k), 4096 // bn)), num_warps=4)


def _words_aligned(x2: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the codes of x2 and w can be read as int32 words (what the dp4a GEMV needs)."""
    k = x2.shape[1]
    return (k % 4 == 0 and x2.stride(0) % 4 == 0 and w.stride(0) % 4 == 0 and x2.data_ptr() % 4 == 0
            and w.data_ptr() % 4 == 0)


def int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out_scale: torch.Tensor | None = None, config: dict[str, int] | None = None,
                preload: bool = False) -> torch.Tensor | None:
    """W8A8 linear for x_q (..., K) and w_q (N, K), both int8; float out_dtype, or int8 when out_scale is
    given. Scales are fp32 tensors (0-d or per row for x, 0-d or (N,) for w, any of those for out).
    `config` overrides the tile choice (for tuning; DP4A=1 picks the dp4a GEMV). `preload`: no kernel still
    running writes w_q, so the dp4a GEMV may load it before its PDL wait (a model's constant weights:
    common.PRELOAD_WEIGHTS). Returns None when a scale layout is one the kernels don't take."""
    *lead, k = x_q.shape
    n = w_q.shape[0]
    x2 = x_q.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    m = x2.shape[0]
    xs_mode = scale_mode(x_scale, x_q.shape)
    ws_mode = scale_mode(w_scale, (m, n))
    os_mode = None if out_scale is None else scale_mode(out_scale, (*lead, n))
    if xs_mode not in (PER_TENSOR, PER_ROW) or ws_mode not in (PER_TENSOR, PER_CHANNEL) or (
            out_scale is not None and os_mode is None):
        return None
    out = torch.empty(m, n, device=x_q.device, dtype=torch.int8 if out_scale is not None else out_dtype)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    dev = x_q.device
    xs, ws = flat_scale(x_scale, dev), flat_scale(w_scale, dev)
    os_ = flat_scale(out_scale, dev) if out_scale is not None else xs
    b = bias.contiguous() if bias is not None else xs
    args = (x2, w, out, xs, ws, b, os_, m, n, k, x2.stride(0), w.stride(0), out.stride(0))
    flags = dict(XS_MODE=xs_mode, WS_MODE=ws_mode, HAS_BIAS=bias is not None, OUT_INT8=out_scale is not None,
                 OS_MODE=os_mode or PER_TENSOR, enable_fp_fusion=False)
    if m <= GEMV_MAX_ROWS:
        cfg = {**_gemv_config(n, k), **GEMV_TUNED.get((n, k), {}), **pdl_options(dev), **(config or {})}
        if cfg.pop("DP4A", 0) and _words_aligned(x2, w):
            cfg["BLOCK_K"] = max(cfg["BLOCK_K"] // 4, 1)
            cfg.setdefault("PRELOAD", int(preload and common.PRELOAD_WEIGHTS))
            _gemv_dp4a_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), m)](*args, **flags, **cfg)
        else:
            _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), m)](*args, **flags, **cfg)
    else:
        cfg = {**_gemm_config(m, n, k), **(config or {})}
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **flags, **cfg)
    return out.reshape(*lead, n)
