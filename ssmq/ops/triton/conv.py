"""Causal depthwise conv1d kernels, on int8 codes (ssmq.ops.int8_conv) or floats (ssmq.ops.conv),
with the SiLU and the output quantization fused.

    acc[t, c] = sum_j w[c, j] * x[t - (k-1) + j, c]      int32 (exact) on codes, fp32 on floats
    pre       = fp32(acc) * (x_scale * w_scale) + bias    (codes)   or   acc + bias   (floats)
    out       = pre (fp32)  |  silu(pre) in x's dtype  |  quantize(silu(pre), out_scale)

The state is the k-1 inputs before x (codes or floats, zeros when absent). Prefill runs one program per
(time block, channel block, sequence); the program of the last time block also writes the new state.
A one-token step has its own kernel, which may write the new state over the old one in place (each
program reads its channels' state before a barrier, then writes them), as a static decode cache needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton.common import (PER_CHANNEL, PER_TENSOR, flat_scale, load_scale, next_pow2, pdl_options,
                                    quantize_rn, scale_mode, silu, wait_for_inputs)

OUT_PRE, OUT_SILU, OUT_Q8 = 0, 1, 2
_STEP_TILES = {"BLOCK_C": 64, "num_warps": 1}
"""The one-token step's tiles: many small programs. gpu_check m2time on an H200, mamba2-8b (10240 channels):
int8 1.5 us against 2.4 us with 256 channels and 2 warps, fp16 1.3 against 1.8 us."""


@triton.jit
def _conv_epilogue(acc, cols, cmask, b_ptr, xs_ptr, ws_ptr, os_ptr, IS_INT: tl.constexpr,
                   XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, OS_MODE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, OUT: tl.constexpr):
    """The values to store for accumulators `acc` (any shape ending in the channel axis `cols`)."""
    if IS_INT:
        scale = load_scale(xs_ptr, XS_MODE, 0, cols, cmask) * load_scale(ws_ptr, WS_MODE, 0, cols, cmask)
        pre = acc.to(tl.float32) * scale
    else:
        pre = acc
    if HAS_BIAS:
        pre = pre + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if OUT == 0:
        return pre
    elif OUT == 1:
        return silu(pre)
    else:
        return quantize_rn(silu(pre), load_scale(os_ptr, OS_MODE, 0, cols, cmask))


@triton.jit
def _conv_prefill_kernel(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, ns_ptr, xs_ptr, ws_ptr, os_ptr, L, C,
                         stride_xb, stride_xl, stride_wc, stride_sb, stride_sl,
                         KW: tl.constexpr, KWP: tl.constexpr, HAS_STATE: tl.constexpr, IS_INT: tl.constexpr,
                         XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, OS_MODE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, OUT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    x_base = x_ptr + b * stride_xb
    s_base = s_ptr + b * stride_sb
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.int32 if IS_INT else tl.float32)
    for j in tl.static_range(KW):
        src = t - (KW - 1) + j  # time of the input that tap j reads; < 0 means the state
        xv = tl.load(x_base + src[:, None] * stride_xl + c[None, :],
                     mask=((src >= 0) & (t < L))[:, None] & cmask[None, :], other=0)
        if HAS_STATE:
            xv += tl.load(s_base + (src + KW - 1)[:, None] * stride_sl + c[None, :],
                          mask=((src < 0) & (t < L))[:, None] & cmask[None, :], other=0)
        wj = tl.load(w_ptr + c * stride_wc + j, mask=cmask, other=0)
        if IS_INT:
            acc += xv.to(tl.int32) * wj.to(tl.int32)[None, :]
        else:
            acc += xv.to(tl.float32) * wj.to(tl.float32)[None, :]
    v = _conv_epilogue(acc, c[None, :], cmask[None, :], b_ptr, xs_ptr, ws_ptr, os_ptr, IS_INT,
                       XS_MODE, WS_MODE, OS_MODE, HAS_BIAS, OUT)
    tl.store(out_ptr + (b * L + t)[:, None] * C + c[None, :], v.to(out_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & cmask[None, :])
    if pid_l == tl.num_programs(0) - 1:  # the new state: the last k-1 entries of cat(state, x)
        i = tl.arange(0, KWP)
        tail = L - (KW - 1) + i
        keep = (i < KW - 1)[:, None] & cmask[None, :]
        sv = tl.load(x_base + tail[:, None] * stride_xl + c[None, :], mask=(tail >= 0)[:, None] & keep, other=0)
        if HAS_STATE:
            sv += tl.load(s_base + (tail + KW - 1)[:, None] * stride_sl + c[None, :],
                          mask=(tail < 0)[:, None] & keep, other=0)
        tl.store(ns_ptr + (b * (KW - 1) + i)[:, None] * C + c[None, :], sv, mask=keep)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, ns_ptr, xs_ptr, ws_ptr, os_ptr, C,
                      stride_xb, stride_wc, stride_sb, stride_sl, stride_nb, stride_nl,
                      KW: tl.constexpr, KWP: tl.constexpr, HAS_STATE: tl.constexpr, IS_INT: tl.constexpr,
                      XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, OS_MODE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, OUT: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + b * stride_xb + c, mask=cmask, other=0)
    conv_step_channels(x, c, cmask, w_ptr, b_ptr, s_ptr + b * stride_sb, out_ptr + b * C, ns_ptr + b * stride_nb,
                       xs_ptr, ws_ptr, os_ptr, stride_wc, stride_sl, stride_nl, KW, KWP, HAS_STATE, IS_INT, XS_MODE,
                       WS_MODE, OS_MODE, HAS_BIAS, OUT)


@triton.jit
def conv_step_channels(x, c, cmask, w_ptr, b_ptr, s_ptr, out_ptr, ns_ptr, xs_ptr, ws_ptr, os_ptr, stride_wc,
                       stride_sl, stride_nl, KW: tl.constexpr, KWP: tl.constexpr, HAS_STATE: tl.constexpr,
                       IS_INT: tl.constexpr, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, OS_MODE: tl.constexpr,
                       HAS_BIAS: tl.constexpr, OUT: tl.constexpr):
    """One token of the conv for channels c (a vector) of one sequence, whose new inputs x the caller holds:
    stores the output at out_ptr + c and the new state (the last k-1 inputs) at ns_ptr + j * stride_nl + c,
    which may be the old one at s_ptr (each program reads its channels' state before a barrier, then
    writes them). The conv step kernel runs it, and the W4A8 GEMV in the epilogue of an in_proj whose
    output channels are the conv's inputs (ssmq.ops.triton.w4.w4a8_linear_conv_step)."""
    i = tl.arange(0, KWP)
    rows = (i < KW - 1)[:, None] & cmask[None, :]
    w_last = tl.load(w_ptr + c * stride_wc + (KW - 1), mask=cmask, other=0)
    w_prev = tl.load(w_ptr + c[None, :] * stride_wc + i[:, None], mask=rows, other=0)
    if HAS_STATE:
        s_rows = s_ptr + c[None, :]
        state = tl.load(s_rows + i[:, None] * stride_sl, mask=rows, other=0)
        shifted = tl.load(s_rows + (i + 1)[:, None] * stride_sl, mask=((i + 1) < KW - 1)[:, None] & rows, other=0)
    else:
        state = tl.zeros(rows.shape, dtype=x.dtype)
        shifted = state
    if IS_INT:
        acc = tl.sum(state.to(tl.int32) * w_prev.to(tl.int32), axis=0) + x.to(tl.int32) * w_last.to(tl.int32)
    else:
        acc = tl.sum(state.to(tl.float32) * w_prev.to(tl.float32), axis=0) + x.to(tl.float32) * w_last.to(tl.float32)
    v = _conv_epilogue(acc, c, cmask, b_ptr, xs_ptr, ws_ptr, os_ptr, IS_INT, XS_MODE, WS_MODE, OS_MODE, HAS_BIAS, OUT)
    tl.store(out_ptr + c, v.to(out_ptr.dtype.element_ty), mask=cmask)
    new_state = tl.where((i == KW - 2)[:, None], x[None, :], shifted)
    tl.debug_barrier()  # every read of the old state is done before the (possibly in-place) write
    tl.store(ns_ptr + i[:, None] * stride_nl + c[None, :], new_state, mask=rows)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
           out: int, x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
           out_scale: torch.Tensor | None = None, inplace: bool = False, config: dict[str, int] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal depthwise conv of x (b, l, c) with weight (c, k) and state (b, k-1, c) or None; int8 x and
    weight when x_scale is given. `out` is OUT_PRE (fp32), OUT_SILU (x's dtype) or OUT_Q8 (int8 codes
    for out_scale). Returns (out, new state); the new state overwrites `state` when `inplace` and l == 1.
    None when a scale layout is one the kernels don't take."""
    batch, length, channels = x.shape
    k = weight.shape[-1]
    is_int = x_scale is not None
    modes = [PER_TENSOR, PER_TENSOR, PER_TENSOR]
    for n, s in enumerate((x_scale, w_scale, out_scale)):
        if s is not None:
            mode = scale_mode(s, (channels,))
            if mode not in (PER_TENSOR, PER_CHANNEL):
                return None
            modes[n] = mode
    dev = x.device
    x = _channels_last(x)
    weight = _channels_last(weight)
    if state is not None and state.dtype != x.dtype:
        state, inplace = state.to(x.dtype), False
    if state is not None:
        state = _channels_last(state)
    out_dtype = torch.float32 if out == OUT_PRE else torch.int8 if out == OUT_Q8 else x.dtype
    result = torch.empty(batch, length, channels, device=dev, dtype=out_dtype)
    step = length == 1 and k > 1
    new_state = state if (inplace and step and state is not None) else torch.empty(
        batch, k - 1, channels, device=dev, dtype=x.dtype)
    if batch == 0 or length == 0 or channels == 0:
        return result, (state if state is not None else new_state.zero_())
    dummy = weight  # stands in for absent tensors: the kernel never reads it (a tensor made here would be
    # a host-to-device copy, which a CUDA graph capture forbids)
    scales = [flat_scale(s, dev) if s is not None else dummy for s in (x_scale, w_scale, out_scale)]
    s_arg = state if state is not None else new_state
    flags = dict(KW=k, KWP=max(next_pow2(k - 1), 1), HAS_STATE=state is not None, IS_INT=is_int, XS_MODE=modes[0],
                 WS_MODE=modes[1], OS_MODE=modes[2], HAS_BIAS=bias is not None, OUT=out)
    b_arg = bias.contiguous() if bias is not None else dummy
    if step:
        cfg = {**_STEP_TILES, "BLOCK_C": min(_STEP_TILES["BLOCK_C"], next_pow2(channels)), **(config or {})}
        _conv_step_kernel[(triton.cdiv(channels, cfg["BLOCK_C"]), batch)](
            x, weight, b_arg, s_arg, result, new_state, *scales, channels, x.stride(0), weight.stride(0),
            s_arg.stride(0), s_arg.stride(1), new_state.stride(0), new_state.stride(1), **flags, **cfg,
            enable_fp_fusion=False, **pdl_options(dev))
    else:
        block_c = min(128, next_pow2(channels))
        block_l = min(32, next_pow2(length))
        grid = (triton.cdiv(length, block_l), triton.cdiv(channels, block_c), batch)
        _conv_prefill_kernel[grid](
            x, weight, b_arg, s_arg, result, new_state, *scales, length, channels, x.stride(0), x.stride(1),
            weight.stride(0), s_arg.stride(0), s_arg.stride(1), **flags, BLOCK_L=block_l, BLOCK_C=block_c,
            num_warps=4, enable_fp_fusion=False)
    return result, new_state
