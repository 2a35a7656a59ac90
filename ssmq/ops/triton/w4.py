"""Linear kernels with packed int4 weights (ssmq.ops.int4_linear): W4A16 and W4A8, GEMM and GEMV.

    W4A16: out = sum_groups (x @ code_grp^T) * scale[n, grp] + bias           fp32 accumulation
    W4A8:  acc = sum_groups g[n, grp] * (x_q @ code_grp^T)                     int32, exact
           v   = fp32(acc) * (x_scale * s_c) + bias, then out_dtype or quantize(v, out_scale)

Each packed byte holds the codes of columns 2j (low nibble) and 2j+1 (high nibble), so a kernel never
interleaves them: it multiplies the low nibbles by x's even columns and the high nibbles by its odd
columns (two half-width products per group instead of one full one, the same work). The bytes are
read as int8: `(b << 4) >> 4` and `b >> 4` (arithmetic shifts) are then the two signed codes. Codes are
exact in fp16 and int8, so the per-group products are exact and each group's scale is applied to the
product's fp32 sum (W4A16) or integer sum (W4A8) once.

Prefill (many rows) of W4A8 splits the integer weights g * code into two int8 planes, 16 * hi + lo, sums x
against both with cuBLAS's int8 GEMM (torch._int_mm, int32) and forms 16 * hi + lo in the epilogue kernel:
the same integers as the GEMV, bit for bit (_w4a8_int_mm, from INT_MM_MIN_ROWS rows). Below that, and with
config INT_MM=0, a tiled GEMM on the tensor cores (int8 products with int32 accumulation) takes one
weight group (128 columns) per K step and scales each group's sum; W4A16 has the same GEMM (fp16 products
with fp32 accumulation, fp32 products for fp32 x) but by default dequantizes the weights to x's dtype and
runs cuBLAS.
Decoding (a few rows) is a GEMV that streams several groups of several weight rows per step on the CUDA
cores. W4A8 decoding reads the weights as int32 words of eight codes and multiplies them with dp4a: the
low nibbles of a word, XOR 8, are four unsigned bytes code + 8 (columns 8q, 8q+2, 8q+4, 8q+6), the high
nibbles the odd columns, and x's words are regrouped into its even and odd bytes to match; each word's
sum is then dot(code + 8, x) - 8 * sum(x), which times its group's scale is accumulated element-wise and
summed once at the end, still exact in int32. By default the kernel runs a second loop (X_TILE) that
regroups the codes' bytes instead of x's (see the kernel); the first serves x rows that are not 8-byte
aligned. Mamba2's decoding in_proj, whose x|B|C outputs are the conv's inputs, runs the conv step in the
same GEMV's epilogue (w4a8_linear_conv_step). The W4A8 epilogue is the W8A8 one
(ssmq.ops.triton.linear), run without fp contraction, so int8 outputs are bit-identical to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton import common
from ssmq.ops.triton.common import (INTERPRETED, PER_CHANNEL, PER_ROW, PER_TENSOR, flat_scale, let_next_start,
                                    next_pow2, pdl_options, scale_mode, wait_for_inputs)
from ssmq.ops.triton.conv import conv_step_channels
from ssmq.ops.triton.linear import GEMV_MAX_ROWS, _dp4a, _epilogue, _words_aligned

_FLOATS = (torch.float16, torch.float32)  # bf16 x takes the reference (the interpreter cannot test it)


@triton.jit
def _unpack(wb):
    """The signed codes (low nibble, high nibble) of int8 bytes."""
    return (wb << 4) >> 4, wb >> 4


@triton.jit
def _store(acc, rows, cols, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, A8: tl.constexpr,
           XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT8: tl.constexpr,
           OS_MODE: tl.constexpr):
    """W4A8: the W8A8 epilogue (rescale, bias, float or requantized int8). W4A16: + bias, in out's dtype."""
    if A8:
        _epilogue(acc, rows, cols, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, XS_MODE, WS_MODE,
                  HAS_BIAS, OUT_INT8, OS_MODE)
    else:
        v = acc
        if HAS_BIAS:
            v = v + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64) * stride_om + cols, v.to(out_ptr.dtype.element_ty),
                 mask=(rows < M) & (cols < N))


@triton.jit
def _w4_gemm_kernel(x_ptr, w_ptr, gs_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, NG, HALF,
                    stride_xm, stride_wn, stride_gn, stride_om,
                    A8: tl.constexpr, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, FULL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HG: tl.constexpr, GROUP_M: tl.constexpr):
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
    j = tl.arange(0, HG)  # byte j of a group: columns 2j and 2j + 1
    jmask = j < HALF
    kk = tl.arange(0, 2 * HG)
    # rows and columns past the edge wrap around: loaded, computed, never stored
    x_rows = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm + kk[None, :]
    w_cols = w_ptr + (rn % N).to(tl.int64)[None, :] * stride_wn + j[:, None]
    g_cols = gs_ptr + (rn % N).to(tl.int64) * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A8 else tl.float32)
    for grp in range(0, NG):
        if FULL:  # HG == HALF: no mask, so the loads are vectorized
            xt = tl.load(x_rows)
            wb = tl.load(w_cols)
        else:
            xt = tl.load(x_rows, mask=(kk < 2 * HALF)[None, :], other=0)
            wb = tl.load(w_cols, mask=jmask[:, None], other=0)
        xe, xo = tl.split(tl.reshape(xt, (BLOCK_M, HG, 2)))  # x's even and odd columns
        lo, hi = _unpack(wb)
        if A8:
            part = tl.dot(xo, hi, tl.dot(xe, lo, out_dtype=tl.int32), out_dtype=tl.int32)
            acc += part * tl.load(g_cols + grp).to(tl.int32)[None, :]
        elif x_ptr.dtype.element_ty == tl.float32:
            part = tl.dot(xo, hi.to(tl.float32), tl.dot(xe, lo.to(tl.float32), input_precision="ieee"),
                          input_precision="ieee")
            acc += part * tl.load(g_cols + grp)[None, :]
        else:  # codes are exact in fp16
            part = tl.dot(xo, hi.to(xe.dtype), tl.dot(xe, lo.to(xe.dtype)))
            acc += part * tl.load(g_cols + grp)[None, :]
        x_rows += 2 * HALF
        w_cols += HALF
    _store(acc, rm[:, None], rn[None, :], M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, A8, XS_MODE,
           WS_MODE, HAS_BIAS, OUT_INT8, OS_MODE)


@triton.jit
def _w4_gemv_kernel(x_ptr, w_ptr, gs_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, NG, HALF,
                    stride_xm, stride_wn, stride_gn, stride_om,
                    A8: tl.constexpr, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, FULL: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, HG: tl.constexpr, PDL: tl.constexpr):
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gi = tl.arange(0, BLOCK_G)
    j = tl.arange(0, HG)
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None, None] * stride_wn
    g_rows = gs_ptr + (rn % N).to(tl.int64)[:, None] * stride_gn
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    wait_for_inputs(PDL, False)
    acc = tl.zeros((BLOCK_N,), dtype=tl.int32 if A8 else tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        grp = g0 + gi
        gmask = grp < NG
        kb = grp[:, None] * HALF + j[None, :]  # (groups, bytes): byte index in the row
        kmask = gmask[:, None] if FULL else gmask[:, None] & (j < HALF)[None, :]  # FULL: vectorized loads
        xe = tl.load(x_row + 2 * kb, mask=kmask, other=0)
        xo = tl.load(x_row + 2 * kb + 1, mask=kmask, other=0)
        lo, hi = _unpack(tl.load(w_rows + kb[None, :, :], mask=kmask[None, :, :], other=0))
        if A8:
            part = tl.sum(lo.to(tl.int32) * xe.to(tl.int32)[None, :, :] + hi.to(tl.int32) * xo.to(tl.int32)[None, :, :],
                          axis=2)
            acc += tl.sum(part * tl.load(g_rows + grp[None, :], mask=gmask[None, :], other=0).to(tl.int32), axis=1)
        else:
            part = tl.sum(lo.to(tl.float32) * xe.to(tl.float32)[None, :, :]
                          + hi.to(tl.float32) * xo.to(tl.float32)[None, :, :], axis=2)
            acc += tl.sum(part * tl.load(g_rows + grp[None, :], mask=gmask[None, :], other=0.0), axis=1)
    let_next_start(PDL)
    _store(acc, m, rn, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, A8, XS_MODE, WS_MODE, HAS_BIAS,
           OUT_INT8, OS_MODE)


@triton.jit
def _even_odd_bytes(xa, xb):
    """The int8 lanes (x0, x2, x4, x6) and (x1, x3, x5, x7) of two int32 words (x0..x3) and (x4..x7)."""
    top = -16777216  # 0xFF000000 as an int32
    even = (xa & 0xFF) | ((xa >> 8) & 0xFF00) | ((xb << 16) & 0xFF0000) | ((xb << 8) & top)
    odd = ((xa >> 8) & 0xFF) | ((xa >> 16) & 0xFF00) | ((xb << 8) & 0xFF0000) | (xb & top)
    return even, odd


if INTERPRETED:  # the interpreter runs no inline PTX: the same bytes, by shifts
    @triton.jit
    def _codes_x16(w):
        """16 * the signed codes of int32 words of eight (see _w4a8_gemv_dp4a_kernel's X_TILE) as two words
        of int8 lanes: columns 8q..8q+3, then 8q+4..8q+7 (each code's nibble moved to the top of a byte)."""
        u = w << 4
        top = -252645136  # 0xF0F0F0F0 as an int32
        lo = (u & 0xFF) | ((w & 0xFF) << 8) | ((u & 0xFF00) << 8) | ((w & 0xFF00) << 16)
        hi = ((u >> 16) & 0xFF) | (((w >> 16) & 0xFF) << 8) | (((u >> 24) & 0xFF) << 16) | (((w >> 24) & 0xFF) << 24)
        return lo & top, hi & top
else:
    @triton.jit
    def _codes_x16(w):
        """16 * the signed codes of int32 words of eight (see _w4a8_gemv_dp4a_kernel's X_TILE) as two words
        of int8 lanes: columns 8q..8q+3, then 8q+4..8q+7: with u = w << 4, byte j of a code pair lies at
        the top of u's byte j (low nibble) and of w's (high nibble), and one byte permute each interleaves
        them."""
        return tl.inline_asm_elementwise(
            "{ .reg .b32 u; shl.b32 u, $2, 4; prmt.b32 $0, u, $2, 0x5140; prmt.b32 $1, u, $2, 0x7362; "
            "and.b32 $0, $0, 0xF0F0F0F0; and.b32 $1, $1, 0xF0F0F0F0; }",
            "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _word_tile(w_rows, g_rows, g0, gi, q, NG: tl.constexpr, WG: tl.constexpr, FULL: tl.constexpr,
               EVICT: tl.constexpr):
    """A GEMV step's weight words (rows, groups, words) and group scales (rows, groups) from group g0 on,
    with the word indices and masks that x's matching words take."""
    grp = g0 + gi
    gmask = grp < NG
    kw = grp[:, None] * WG + q[None, :]  # (groups, words): word index in the packed row
    kmask = gmask[:, None] if FULL else gmask[:, None] & (q < WG)[None, :]
    w = tl.load(w_rows + kw[None, :, :], mask=kmask[None, :, :], other=0, eviction_policy=EVICT)
    g = tl.load(g_rows + grp[None, :], mask=gmask[None, :], other=0, eviction_policy=EVICT)
    return w, g, kw, kmask


@triton.jit
def _x_tile_sums(w, g, kw, kmask, x_row, rows0):
    """The X_TILE loop's step: each row's exact int32 sum per group, times the group's scale."""
    kw3 = kw[None, :, :] + rows0  # x's 8-byte words, in the weight tile's 3-D shape (rows0 == 0 is
    m3 = kmask[None, :, :] & (rows0 == 0)  # all true: it gives the mask that shape too)
    x8 = tl.load(x_row.to(tl.pointer_type(tl.int64)) + kw3, mask=m3, other=0)
    lo, hi = _codes_x16(w)
    d = _dp4a(hi, (x8 >> 32).to(tl.int32), _dp4a(lo, x8.to(tl.int32), tl.zeros(w.shape, tl.int32)))
    return (tl.sum(d, axis=2) >> 4) * g.to(tl.int32)


@triton.jit
def _w4a8_gemv_dp4a_kernel(x_ptr, w_ptr, gs_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N,
                           NG: tl.constexpr, HALF: tl.constexpr, stride_xm, stride_wn, stride_gn, stride_om,
                           XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, FULL: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HW: tl.constexpr, UNROLL: tl.constexpr,
                           X_TILE: tl.constexpr, PRELOAD: tl.constexpr, PDL: tl.constexpr, EVICT: tl.constexpr,
                           cw_ptr, cb_ptr, cws_ptr, cos_ptr, cs_ptr, cns_ptr, cout_ptr, CONV_START, CONV_C,
                           stride_cwc, stride_csb, stride_csl, stride_cnb, stride_cnl, stride_cob,
                           CONV: tl.constexpr, KW: tl.constexpr, KWP: tl.constexpr, C_WS_MODE: tl.constexpr,
                           C_OS_MODE: tl.constexpr, C_HAS_BIAS: tl.constexpr):
    """The W4A8 GEMV on int32 words (see the module docstring): HALF bytes, so HALF / 4 words, per group (HW
    their power-of-two cover); K, the row strides and the pointers are multiples of 4 bytes (the launcher
    checks). Each word's exact sum times its group's scale is accumulated element-wise, as the W8A8 dp4a
    GEMV does, and reduced once at the end: no cross-thread sum per step (int32 sums are exact in any order).
    The group count and size are compile-time constants, so that the word loads vectorize and UNROLL steps
    of the loop over K issue their loads together; EVICT is the weight loads' L2 eviction policy
    (common.WEIGHT_EVICTION). PRELOAD (X_TILE only; a model's constant weights, common.PRELOAD_WEIGHTS): the
    first step's weights and group scales are loaded before the PDL wait, while the kernel before finishes.

    X_TILE (the default loop, _dp4a_config; x's rows 8-byte aligned): x is read as 8-byte words in the
    weight tile's layout, so that x's values do not cross threads through shared memory in the loop (the
    other loop's do: 8 barriers per step in its sm_90 PTX, 2 with X_TILE), and the codes' bytes are regrouped
    instead of x's (_codes_x16: 16 * code as int8 lanes in column order), so dp4a takes x's words as they
    are and no x sums are needed: each group's sum is 16 times the exact one, shifted back (exactly) before
    its scale.

    CONV: output channels CONV_START .. CONV_START + CONV_C (whole programs) are the int8 inputs of a causal
    conv step (c* pointers: its weights, bias, scales, state, new state and output; w4a8_linear_conv_step),
    which their programs run on the codes they just stored (conv.conv_step_channels)."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gi = tl.arange(0, BLOCK_G)
    q = tl.arange(0, HW)
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + (rn % N).to(tl.int64)[:, None, None] * (stride_wn // 4)
    g_rows = gs_ptr + (rn % N).to(tl.int64)[:, None] * stride_gn
    WG: tl.constexpr = HALF // 4
    if X_TILE and PRELOAD:
        w0, gs0, kw0, kmask0 = _word_tile(w_rows, g_rows, 0, gi, q, NG, WG, FULL, EVICT)
    wait_for_inputs(PDL, False)
    x_row = x_ptr.to(tl.pointer_type(tl.int32)) + m.to(tl.int64) * (stride_xm // 4)
    shape: tl.constexpr = (BLOCK_N, BLOCK_G, HW)
    if X_TILE:  # one int32 sum per row and group, scaled
        rows0 = tl.zeros((BLOCK_N, 1, 1), dtype=tl.int32)
        acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.int32)
        FIRST: tl.constexpr = BLOCK_G * PRELOAD
        if PRELOAD:
            acc += _x_tile_sums(w0, gs0, kw0, kmask0, x_row, rows0)
        for g0 in tl.range(FIRST, NG, BLOCK_G, loop_unroll_factor=UNROLL):
            w, g, kw, kmask = _word_tile(w_rows, g_rows, g0, gi, q, NG, WG, FULL, EVICT)
            acc += _x_tile_sums(w, g, kw, kmask, x_row, rows0)
    else:  # one per word, scaled
        acc = tl.zeros(shape, dtype=tl.int32)
        for g0 in tl.range(0, NG, BLOCK_G, loop_unroll_factor=UNROLL):
            w, g, kw, kmask = _word_tile(w_rows, g_rows, g0, gi, q, NG, WG, FULL, EVICT)
            xa = tl.load(x_row + 2 * kw, mask=kmask, other=0)
            xb = tl.load(x_row + 2 * kw + 1, mask=kmask, other=0)
            xe, xo = _even_odd_bytes(xa, xb)
            ones = tl.full(xa.shape, 0x01010101, tl.int32)
            xsum8 = 8 * _dp4a(xb, ones, _dp4a(xa, ones, tl.zeros(xa.shape, tl.int32)))  # 8 * the word's x sum
            g = g.to(tl.int32)
            d = _dp4a((w & 0x0F0F0F0F) ^ 0x08080808, tl.broadcast_to(xe[None, :, :], shape),
                      tl.zeros(shape, tl.int32))
            d = _dp4a(((w >> 4) & 0x0F0F0F0F) ^ 0x08080808, tl.broadcast_to(xo[None, :, :], shape), d)
            acc += (d - xsum8[None, :, :]) * g[:, :, None]  # each word's exact sum, times its group's scale
    let_next_start(PDL)
    total = tl.sum(acc, axis=1) if X_TILE else tl.sum(tl.sum(acc, axis=2), axis=1)
    codes = _epilogue(total, m, rn, M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, XS_MODE, WS_MODE,
                      HAS_BIAS, OUT_INT8, OS_MODE)
    if CONV:
        first = tl.program_id(0) * BLOCK_N
        if (first >= CONV_START) & (first < CONV_START + CONV_C):
            c = rn - CONV_START
            row = m.to(tl.int64)
            cxs_ptr = os_ptr  # the conv's input scale is this output's scale
            if OS_MODE == 1:
                cxs_ptr = os_ptr + CONV_START
            conv_step_channels(codes, c, c < CONV_C, cw_ptr, cb_ptr, cs_ptr + row * stride_csb,
                               cout_ptr + row * stride_cob, cns_ptr + row * stride_cnb, cxs_ptr, cws_ptr, cos_ptr,
                               stride_cwc, stride_csl, stride_cnl, KW, KWP, True, True, OS_MODE, C_WS_MODE,
                               C_OS_MODE, C_HAS_BIAS, 2)


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, GROUP, stride_wn, stride_sn, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """W4A16 weights code * scale (fp32 product) in out's dtype, (N, K) from packed bytes (N, K/2)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # byte j: columns 2j and 2j + 1
    mask = (rn < N)[:, None] & (j < K // 2)[None, :]
    lo, hi = _unpack(tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + j[None, :], mask=mask, other=0))
    scale = tl.load(s_ptr + rn.to(tl.int64)[:, None] * stride_sn + (2 * j // GROUP)[None, :], mask=mask, other=0.0)
    codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_J))  # interleaved: column 2j, then 2j + 1
    w = codes.to(tl.float32) * tl.reshape(tl.join(scale, scale), (BLOCK_N, 2 * BLOCK_J))
    cols = 2 * tl.program_id(1) * BLOCK_J + tl.arange(0, 2 * BLOCK_J)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(rn < N)[:, None] & (cols < K)[None, :])


@triton.jit
def _w4a8_planes_kernel(w_ptr, gs_ptr, out_ptr, N, K, GROUP, stride_wn, stride_gn,
                        BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """The W4A8 weights of rows 0..N-1 as two int8 planes (2N, K) for an int8 matmul with int32 sums: the
    integer weight g * code (in [-1016, 1016]) is 16 * hi + lo with hi = w >> 4 in [-64, 63] (out's rows
    0..N-1) and lo = w & 15 in [0, 15] (rows N..2N-1)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # byte j: columns 2j and 2j + 1 (one group)
    mask = (rn < N)[:, None] & (j < K // 2)[None, :]
    lo, hi = _unpack(tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + j[None, :], mask=mask, other=0))
    g = tl.load(gs_ptr + rn.to(tl.int64)[:, None] * stride_gn + (2 * j // GROUP)[None, :], mask=mask, other=0)
    codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * BLOCK_J)).to(tl.int32)  # column 2j, then 2j + 1
    w = codes * tl.reshape(tl.join(g, g), (BLOCK_N, 2 * BLOCK_J)).to(tl.int32)
    cols = 2 * tl.program_id(1) * BLOCK_J + tl.arange(0, 2 * BLOCK_J)
    store = (rn < N)[:, None] & (cols < K)[None, :]
    rows = out_ptr + rn.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(rows, (w >> 4).to(tl.int8), mask=store)
    tl.store(rows + N * K, (w & 15).to(tl.int8), mask=store)


@triton.jit
def _w4a8_combine_kernel(acc_ptr, out_ptr, xs_ptr, ws_ptr, b_ptr, os_ptr, M, N, stride_am, stride_om,
                         XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The W4A8 epilogue on the int32 sums (M, 2N) of x with the two planes: 16 * hi + lo (exact)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    sums = acc_ptr + rm.to(tl.int64)[:, None] * stride_am + rn[None, :]
    acc = tl.load(sums, mask=mask, other=0) * 16 + tl.load(sums + N, mask=mask, other=0)
    _epilogue(acc, rm[:, None], rn[None, :], M, N, out_ptr, stride_om, xs_ptr, ws_ptr, b_ptr, os_ptr, XS_MODE,
              WS_MODE, HAS_BIAS, OUT_INT8, OS_MODE)


INT_MM_MIN_ROWS = 17
"""From this many rows on (torch._int_mm's minimum on CUDA) W4A8 runs as int8 planes + cuBLAS (_w4a8_int_mm)."""
INT_MM_ROWS = 4096
INT_MM_BYTES = 256 << 20
"""_w4a8_int_mm's chunks: about INT_MM_ROWS rows of x (balanced), and as many weight rows as keep the
temporary memory (planes and int32 sums) under INT_MM_BYTES."""


def _w4a8_int_mm(x2: torch.Tensor, w_packed: torch.Tensor, group_scale: torch.Tensor, out: torch.Tensor,
                 xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, os_: torch.Tensor | None,
                 modes: tuple[int, int, int]) -> None:
    """W4A8 for many rows (prefill): the weights of a chunk of rows become two int8 planes
    (_w4a8_planes_kernel), torch._int_mm (cuBLAS's int8 tensor-core GEMM) sums x against both in int32,
    and _w4a8_combine_kernel forms 16 * hi + lo, the integer the GEMV sums, and applies the epilogue: the
    same int8 or float output, bit for bit. Chunks of rows and columns keep the temporary memory under
    INT_MM_BYTES."""
    m, k = x2.shape
    n, n_groups = group_scale.shape
    x2 = x2.contiguous()
    m_parts = triton.cdiv(m, INT_MM_ROWS)
    mc = triton.cdiv(m, m_parts)  # balanced row chunks, each above INT_MM_MIN_ROWS when m is
    nc = max(64, INT_MM_BYTES // (2 * k + 8 * mc) // 64 * 64)
    xs_mode, ws_mode, os_mode = modes
    bias = bias.contiguous() if bias is not None else None
    for n0 in range(0, n, nc):
        cols = slice(n0, min(n, n0 + nc))
        width = cols.stop - n0
        planes = torch.empty(2 * width, k, device=x2.device, dtype=torch.int8)
        _w4a8_planes_kernel[(triton.cdiv(width, 16), triton.cdiv(k // 2, 64))](
            w_packed[cols].view(torch.int8), group_scale[cols], planes, width, k, k // n_groups, w_packed.stride(0),
            group_scale.stride(0), BLOCK_N=16, BLOCK_J=64, num_warps=4)
        for m0 in range(0, m, mc):
            rows = slice(m0, min(m, m0 + mc))
            acc = torch._int_mm(x2[rows], planes.t())
            height = rows.stop - m0
            part = out[rows, cols]
            _w4a8_combine_kernel[(triton.cdiv(height, 64), triton.cdiv(width, 128))](
                acc, part, _chunk(xs, xs_mode, rows, cols), _chunk(ws, ws_mode, rows, cols),
                bias[cols] if bias is not None else acc, _chunk(os_, os_mode, rows, cols) if os_ is not None else acc,
                height, width, acc.stride(0), part.stride(0), XS_MODE=xs_mode, WS_MODE=ws_mode,
                HAS_BIAS=bias is not None, OUT_INT8=os_ is not None, OS_MODE=os_mode, BLOCK_M=64, BLOCK_N=128,
                num_warps=4, enable_fp_fusion=False)


def _chunk(scale: torch.Tensor, mode: int, rows: slice, cols: slice) -> torch.Tensor:
    """A flat scale's entries for a chunk of rows and columns, by its scale_mode."""
    return scale[rows] if mode == PER_ROW else scale[cols] if mode == PER_CHANNEL else scale


def dequantize_w4a16(w_packed: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype,
                     config: dict[str, int] | None = None) -> torch.Tensor:
    """The W4A16 weights (N, K) as `dtype` (code * scale in fp32, rounded once), for a cuBLAS matmul.
    `config` overrides the tiles (BLOCK_N rows by BLOCK_J packed bytes, num_warps); the default was the
    fastest of gpu_check's m2time sweep on an H200 (26.8 us for the mamba2-2.7b in_proj, 54 MB of fp16)."""
    n, half = w_packed.shape
    cfg = {"BLOCK_N": 16, "BLOCK_J": 128, "num_warps": 4, **(config or {})}
    out = torch.empty(n, 2 * half, device=w_packed.device, dtype=dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(half, cfg["BLOCK_J"]))
    _w4_dequant_kernel[grid](w_packed.view(torch.int8), w_scale, out, n, 2 * half, 2 * half // w_scale.shape[1],
                             w_packed.stride(0), w_scale.stride(0), out.stride(0), **cfg)
    return out


def _gemm_config(m: int, n: int, x_bytes: int) -> dict[str, int]:
    """Tile shapes by problem size (one 128-column weight group per K step). fp32 activations (x_bytes 4)
    take half the row tile and two stages: a 128 x 128 fp32 tile in three stages needs more shared memory
    than a Hopper SM has (272 KiB > 227 KiB)."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64 if triton.cdiv(n, 64) >= 128 else 32, GROUP_M=1, num_warps=4,
                    num_stages=4)
    if m <= 64 or x_bytes > 2:
        return dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=1 if m <= 64 else 8, num_warps=4,
                    num_stages=4 if x_bytes <= 2 else 2)
    return dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3)


def _gemv_config(n: int, n_groups: int, hg: int) -> dict[str, int]:
    """8 weight rows by up to 8 whole groups (dividing the row's groups: no masked tail step) per step, 4
    warps: the fastest of gpu_check's m2time sweep on an H200 for the mamba2-2.7b and -8b projections
    (8b out_proj 18.8 us against 34.8 us for the 4 rows by 16 groups it had before)."""
    bg = max(1, min(8, next_pow2(n_groups), 4096 // (8 * hg)))
    while bg > 1 and n_groups % bg:
        bg //= 2
    return dict(BLOCK_N=8, BLOCK_G=bg, num_warps=4)


def _dp4a_config(n: int, n_groups: int) -> dict[str, int]:
    """The W4A8 dp4a GEMV's tiles, from gpu_check's m2time sweeps on an H200 (CUDA-graph times of the
    mamba2-2.7b and -8b projections and the 8b lm_head); all take the X_TILE loop and 4 warps.
    - Wide layers (N >= 8192): 8 weight rows per step, by 16 groups where 16 divide the row's groups and
      the layer is an in_proj-sized one (8b in_proj 14.4 us against 15.9 with 8 groups), else by 8 (the 8b
      lm_head, 24 waves of programs: 149.6 us against 155.1; the 2.7b in_proj, 20 groups: 6.9 against 8.2).
    - Narrow layers (out_proj, with its long rows): 4 rows by 32 groups where 32 divide the row's groups,
      else by 16 (8b out_proj 7.9 us, 2.7b 3.6 us, against 8.5 and 4.4 with the other loop's best tiles)."""
    if n >= 8192:
        bg = 16 if n_groups % 16 == 0 and n < 65536 else 8
        return dict(BLOCK_N=8, BLOCK_G=min(bg, next_pow2(n_groups)), num_warps=4, UNROLL=1, X_TILE=1)
    bg = 32 if n_groups % 32 == 0 else 16
    return dict(BLOCK_N=4, BLOCK_G=min(bg, next_pow2(n_groups)), num_warps=4, UNROLL=1, X_TILE=1)


DP4A_TUNED: dict[tuple[int, int], dict[str, int]] = {}
"""W4A8 GEMV tiles by (N, K) that replace _dp4a_config's choice, for the process that sets them (benchmarks
compare tiles inside whole-model decoding with it)."""


def dp4a_tiles(n: int, k: int, n_groups: int) -> dict[str, int]:
    """The W4A8 dp4a GEMV's tiles for an (n, k) weight: _dp4a_config's, or DP4A_TUNED's."""
    return {**_dp4a_config(n, n_groups), **DP4A_TUNED.get((n, k), {})}


def _words_ready(x2: torch.Tensor, w_packed: torch.Tensor, n_groups: int) -> bool:
    """Whether x's rows and the packed weights can be read as int32 words (linear._words_aligned), whole
    words per group (8 codes each)."""
    k = x2.shape[1]
    return k % 8 == 0 and (k // n_groups) % 8 == 0 and _words_aligned(x2, w_packed)


def _no_conv(dummy: torch.Tensor) -> dict:
    """The dp4a GEMV's conv-step arguments when it runs none."""
    return dict(cw_ptr=dummy, cb_ptr=dummy, cws_ptr=dummy, cos_ptr=dummy, cs_ptr=dummy, cns_ptr=dummy,
                cout_ptr=dummy, CONV_START=0, CONV_C=0, stride_cwc=0, stride_csb=0, stride_csl=0, stride_cnb=0,
                stride_cnl=0, stride_cob=0, CONV=False, KW=1, KWP=1, C_WS_MODE=PER_TENSOR, C_OS_MODE=PER_TENSOR,
                C_HAS_BIAS=False)


def _dp4a_ready(x2: torch.Tensor, w_packed: torch.Tensor, n_groups: int) -> bool:
    """Whether the W4A8 GEMV on int32 words takes x2's rows."""
    return x2.shape[0] <= GEMV_MAX_ROWS and _words_ready(x2, w_packed, n_groups)


def _launch(x2: torch.Tensor, w_packed: torch.Tensor, group_scale: torch.Tensor, out: torch.Tensor,
            xs: torch.Tensor | None, ws: torch.Tensor | None, bias: torch.Tensor | None, os_: torch.Tensor | None,
            modes: tuple[int, int, int], config: dict[str, int] | None, conv: dict | None = None,
            preload: bool = False) -> None:
    """Run the kernel for the shapes: int8 planes + cuBLAS, the dp4a GEMV (with `conv`, its conv-step
    arguments: w4a8_linear_conv_step, which checked that this GEMV takes the call; with `preload`, loading
    its first weights before its PDL wait: common.PRELOAD_WEIGHTS), the byte GEMV, or the tiled GEMM."""
    m, k = x2.shape
    n, n_groups = group_scale.shape
    half = k // n_groups // 2
    hg = max(32, next_pow2(half))
    dummy = group_scale  # stands in for absent tensors: the kernel never reads it
    a8 = xs is not None
    args = (x2, w_packed.view(torch.int8), group_scale, out, xs if a8 else dummy, ws if a8 else dummy,
            bias.contiguous() if bias is not None else dummy, os_ if os_ is not None else dummy, m, n, n_groups,
            half, x2.stride(0), w_packed.stride(0), group_scale.stride(0), out.stride(0))
    flags = dict(XS_MODE=modes[0], WS_MODE=modes[1], HAS_BIAS=bias is not None, OUT_INT8=os_ is not None,
                 OS_MODE=modes[2], enable_fp_fusion=False)
    cfg = dict(config or {})
    words = cfg.pop("WORDS", 1)  # 0: the W4A8 GEMV on bytes, not int32 words (benchmarks compare the two)
    if a8 and m >= INT_MM_MIN_ROWS and cfg.pop("INT_MM", 1) and k % 8 == 0 and n % 4 == 0:
        _w4a8_int_mm(x2, w_packed, group_scale, out, xs, ws, bias, os_, modes)  # INT_MM=0: the tiled GEMM
        return
    cfg.pop("INT_MM", None)
    if a8 and words and _dp4a_ready(x2, w_packed, n_groups):
        hw = max(2, next_pow2(half // 4))
        cfg = {**dp4a_tiles(n, k, n_groups), "PRELOAD": int(preload and common.PRELOAD_WEIGHTS),
               **pdl_options(x2.device), **cfg}
        if x2.data_ptr() % 8 or x2.stride(0) % 8:  # X_TILE reads x as 8-byte words
            cfg["X_TILE"] = 0
        _w4a8_gemv_dp4a_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), m)](
            *args, **flags, FULL=hw == half // 4, HW=hw, EVICT=common.WEIGHT_EVICTION, **cfg,
            **(conv or _no_conv(dummy)))
        return
    flags.update(A8=a8, FULL=hg == half)
    if m <= GEMV_MAX_ROWS:
        cfg = {**_gemv_config(n, n_groups, hg), **pdl_options(x2.device), **cfg}
        _w4_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), m)](*args, **flags, HG=hg, **cfg)
    else:
        cfg = {**_gemm_config(m, n, x2.element_size()), **cfg}
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w4_gemm_kernel[grid](*args, **flags, HG=hg, **cfg)


def _operands(x: torch.Tensor, w_packed: torch.Tensor, group_scale: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x as rows (M, K) with unit column stride, and the weights and group scales with unit last stride;
    None when the shapes are not those of a packed int4 weight for x (the reference raises the error)."""
    k = x.shape[-1]
    if (w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or 2 * w_packed.shape[1] != k
            or group_scale.dim() != 2 or group_scale.shape[0] != w_packed.shape[0] or group_scale.shape[1] < 1
            or k % group_scale.shape[1] or (k // group_scale.shape[1]) % 2):
        return None
    x2 = x.reshape(-1, k)
    fix = [t if t.stride(-1) == 1 else t.contiguous() for t in (x2, w_packed, group_scale)]
    return fix[0], fix[1], fix[2]


def w4a16_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, config: dict[str, int] | None = None) -> torch.Tensor | None:
    """W4A16 linear of x (..., K) (fp16 or fp32) with packed weights (N, K/2) and fp32 group scales
    (N, K/group); output in out_dtype (default x's). Up to GEMV_MAX_ROWS rows the GEMV streams the packed
    weights; more rows dequantize them to x's dtype and run cuBLAS (3x faster at M = 2048 on an H200 than
    the tiled int4 GEMM, which config DEQUANT=0 selects). `config` overrides the tile choice. None when the
    shapes are not a packed int4 layout (the caller falls back to the reference, which names the error)."""
    if x.dtype not in _FLOATS or w_scale.dtype != torch.float32:
        return None
    ops = _operands(x, w_packed, w_scale)
    if ops is None:
        return None
    x2, w, s = ops
    *lead, _ = x.shape
    n = w.shape[0]
    cfg = dict(config or {})
    if x2.shape[0] > GEMV_MAX_ROWS and cfg.pop("DEQUANT", 1):
        out = torch.nn.functional.linear(x2, dequantize_w4a16(w, s, x.dtype),
                                         None if bias is None else bias.to(x.dtype))
        return out.to(out_dtype or x.dtype).reshape(*lead, n)
    out = torch.empty(x2.shape[0], n, device=x.device, dtype=out_dtype or x.dtype)
    if out.numel():
        _launch(x2, w, s, out, None, None, bias, None, (PER_TENSOR, PER_TENSOR, PER_TENSOR), cfg)
    return out.reshape(*lead, n)


def w4a8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                group_scale: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out_scale: torch.Tensor | None = None, config: dict[str, int] | None = None,
                preload: bool = False) -> torch.Tensor | None:
    """W4A8 linear of int8 x_q (..., K) with packed weights (N, K/2), per-row fp32 scales w_scale (N,) (or
    0-d) and integer group scales (N, K/group); float out_dtype, or int8 when out_scale is given. Scales
    are validated fp32 tensors (x: 0-d or per row). `config` overrides the tiles (INT_MM=0: the tiled GEMM
    instead of the int8 planes for many rows). `preload`: no kernel still running writes the packed
    weights or group scales, so the GEMV may load them before its PDL wait (a model's constant weights).
    None when a layout is one the kernels don't take."""
    ops = _operands(x_q, w_packed, group_scale)
    if ops is None or group_scale.dtype.is_floating_point:
        return None
    x2, w, gs = ops
    *lead, _ = x_q.shape
    m, n = x2.shape[0], w.shape[0]
    xs_mode = scale_mode(x_scale, x_q.shape)
    ws_mode = scale_mode(w_scale, (m, n))
    os_mode = None if out_scale is None else scale_mode(out_scale, (*lead, n))
    if xs_mode not in (PER_TENSOR, PER_ROW) or ws_mode not in (PER_TENSOR, PER_CHANNEL) or (
            out_scale is not None and os_mode is None):
        return None
    out = torch.empty(m, n, device=x_q.device, dtype=torch.int8 if out_scale is not None else out_dtype)
    if out.numel():
        dev = x_q.device
        _launch(x2, w, gs, out, flat_scale(x_scale, dev), flat_scale(w_scale, dev), bias,
                None if out_scale is None else flat_scale(out_scale, dev), (xs_mode, ws_mode, os_mode or PER_TENSOR),
                config, preload=preload)
    return out.reshape(*lead, n)


def w4a8_linear_conv_step(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                          group_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: torch.Tensor, start: int,
                          conv_w: torch.Tensor, conv_w_scale: torch.Tensor, conv_bias: torch.Tensor | None,
                          conv_out_scale: torch.Tensor, state: torch.Tensor, inplace: bool = False,
                          config: dict[str, int] | None = None, preload: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One decoding step of a W4A8 projection whose output channels start .. start + C are the inputs of a
    causal conv step (Mamba's in_proj into conv1d + SiLU + quantize), in one GEMV: w4a8_linear's int8 codes
    for out_scale (0-d or per channel), and for those channels the conv of ssmq.ops.triton.conv.conv1d
    (OUT_Q8) on them, with the conv's weight codes (C, k), fp32 scales (0-d or (C,)), bias and int8 state
    (b, k-1, C). x_q: (b, 1, K) or (b, K), b <= GEMV_MAX_ROWS. Returns (codes (..., N), conv codes
    (..., C), new state), the state overwritten with `inplace`; `preload` as in w4a8_linear; None where
    the fused kernel does not take the layout (the caller runs the two ops)."""
    ops = _operands(x_q, w_packed, group_scale)
    if ops is None or group_scale.dtype.is_floating_point or conv_w.dim() != 2 or state.dim() != 3:
        return None
    x2, w, gs = ops
    *lead, _ = x_q.shape
    m, k = x2.shape
    n, n_groups = w.shape[0], gs.shape[1]
    channels, kw = conv_w.shape
    cfg = {**dp4a_tiles(n, k, n_groups), **(config or {})}
    modes = (scale_mode(x_scale, x_q.shape), scale_mode(w_scale, (m, n)), scale_mode(out_scale, (*lead, n)),
             scale_mode(conv_w_scale, (channels,)), scale_mode(conv_out_scale, (channels,)))
    if (not _dp4a_ready(x2, w, n_groups) or modes[0] not in (PER_TENSOR, PER_ROW)
            or modes[1] not in (PER_TENSOR, PER_CHANNEL) or any(md not in (PER_TENSOR, PER_CHANNEL) for md in modes[2:])
            or start % cfg["BLOCK_N"] or channels % cfg["BLOCK_N"] or not 0 <= start <= n - channels or kw < 2
            or conv_w.dtype != torch.int8 or state.dtype != torch.int8 or state.shape != (m, kw - 1, channels)
            or state.stride(-1) != 1 or conv_w.stride(-1) != 1 or not cfg.get("WORDS", 1)):
        return None
    dev = x_q.device
    out = torch.empty(m, n, device=dev, dtype=torch.int8)
    conv_out = torch.empty(m, channels, device=dev, dtype=torch.int8)
    new_state = state if inplace else torch.empty_like(state)
    os_ = flat_scale(out_scale, dev)
    conv = dict(cw_ptr=conv_w, cb_ptr=conv_bias.contiguous() if conv_bias is not None else os_,
                cws_ptr=flat_scale(conv_w_scale, dev), cos_ptr=flat_scale(conv_out_scale, dev), cs_ptr=state,
                cns_ptr=new_state, cout_ptr=conv_out, CONV_START=start, CONV_C=channels, stride_cwc=conv_w.stride(0),
                stride_csb=state.stride(0), stride_csl=state.stride(1), stride_cnb=new_state.stride(0),
                stride_cnl=new_state.stride(1), stride_cob=conv_out.stride(0), CONV=True, KW=kw,
                KWP=next_pow2(kw - 1), C_WS_MODE=modes[3], C_OS_MODE=modes[4], C_HAS_BIAS=conv_bias is not None)
    _launch(x2, w, gs, out, flat_scale(x_scale, dev), flat_scale(w_scale, dev), bias, os_, modes[:3], cfg, conv,
            preload)
    return out.reshape(*lead, n), conv_out.reshape(*lead, channels), new_state
