"""Residual add + RMSNorm (+ int8 quantization) kernels: ssmq.ops.norm.rms_norm and
ssmq.ops.int8_norm.int8_add_rms_norm, one program per row, the row held in registers; and Mamba2's
gated group-wise RMSNorm (ssmq.ops.norm.gated_rms_norm), one program per (row, group).

    r      = fp32(residual) + fp32(hidden)        (fp32(hidden) without a residual)
    stored = r, or r rounded to hidden's dtype     -> written back as the new residual
    normed = stored * rsqrt(mean(stored^2) + eps)
    out    = quantize(fp32(w) * normed, out_scale)                    (int8 output)
          or  w * normed.to(w.dtype), in w's dtype                     (float output, as rms_norm)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton.common import (PER_CHANNEL, PER_TENSOR, flat_scale, load_scale, next_pow2, prefetch_options,
                                    prefetch_span, quantize_rn, scale_mode, silu, span_lines, wait_for_inputs)


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, out_ptr, res_ptr, os_ptr, D, stride_h, stride_r, eps,
                         HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, ROUND_RES: tl.constexpr,
                         OUT_INT8: tl.constexpr, OS_MODE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                         PREFETCH: tl.constexpr, LINES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    if PREFETCH:  # the weight (by the first row's program), each row's residual (written a layer ago);
        if row == 0:  # LINES covers a row of 4-byte values
            prefetch_span(w_ptr, D * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), LINES)
        if HAS_RES:
            prefetch_span(r_ptr + row * stride_r, D * (r_ptr.dtype.element_ty.primitive_bitwidth // 8), LINES)
    wait_for_inputs(PDL)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    x = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    if OUT_INT8:  # with the other loads: after the row's sum it would add a memory latency
        out_scale = load_scale(os_ptr, OS_MODE, row, cols, mask)
    if ROUND_RES:  # the residual is kept in hidden's dtype: round the sum to it before the norm reads it
        if HAS_RES:
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            x = (r + x.to(tl.float32)).to(h_ptr.dtype.element_ty)
        s = x.to(tl.float32)
    else:
        s = x.to(tl.float32)
        if HAS_RES:
            s = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32) + s
    if STORE_RES:
        tl.store(res_ptr + row * D + cols, s.to(res_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / D + eps)
    normed = s * rstd
    if OUT_INT8:
        v = w.to(tl.float32) * normed
        tl.store(out_ptr + row * D + cols, quantize_rn(v, out_scale), mask=mask)
    else:
        v = w.to(tl.float32) * normed.to(w_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * D + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor, res_out: torch.Tensor | None, round_res: bool,
            out_scale: torch.Tensor | None, os_mode: int) -> None:
    d = hidden.shape[-1]
    h2 = _rows(hidden, d)
    r2 = _rows(residual, d) if residual is not None else h2
    rows = h2.shape[0]
    if rows == 0:
        return
    block = next_pow2(d)
    os_ = flat_scale(out_scale, hidden.device) if out_scale is not None else weight
    _add_rms_norm_kernel[(rows,)](
        h2, r2, weight.contiguous(), out, res_out if res_out is not None else out, os_, d, h2.stride(0),
        r2.stride(0), eps, HAS_RES=residual is not None, STORE_RES=res_out is not None, ROUND_RES=round_res,
        OUT_INT8=out_scale is not None, OS_MODE=os_mode, BLOCK=block, num_warps=_warps(block),
        LINES=span_lines(4 * d), enable_fp_fusion=False, **prefetch_options(hidden.device))


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms-normalised x (fp32 math), in weight's dtype, like ssmq.ops.norm.rms_norm."""
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None, False, None, PER_TENSOR)
    return out


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_in_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(stored, weight, eps), stored) with stored = residual + hidden, kept in fp32 or hidden's dtype."""
    out = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device)
    res = torch.empty(hidden.shape, dtype=torch.float32 if residual_in_fp32 else hidden.dtype, device=hidden.device)
    _launch(hidden, residual, weight, eps, out, res, not residual_in_fp32, None, PER_TENSOR)
    return out, res


def int8_add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      out_scale: torch.Tensor, residual_in_fp32: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 normed codes, new residual) like ssmq.ops.int8_norm.int8_add_rms_norm; None when the out
    scale's layout is one the kernel does not take."""
    mode = scale_mode(out_scale, hidden.shape)
    if mode is None:
        return None
    out = torch.empty(hidden.shape, dtype=torch.int8, device=hidden.device)
    res = torch.empty(hidden.shape, dtype=torch.float32 if residual_in_fp32 else hidden.dtype, device=hidden.device)
    _launch(hidden, residual, weight, eps, out, res, not residual_in_fp32, out_scale, mode)
    return out, res


@triton.jit
def _gated_rms_norm_kernel(y_ptr, g_ptr, gs_ptr, w_ptr, out_ptr, D, GROUP, stride_y, stride_g, eps,
                           GATE_Q: tl.constexpr, GS_MODE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                           PREFETCH: tl.constexpr, LINES: tl.constexpr):
    """h = fp32(y) * silu(gate) over one group of one row, gate = fp32(gate), or fp32(codes) * scale for an
    int8 gate (GATE_Q); out = w * (h * rsqrt(mean(h^2) + eps)), the normalised value rounded to w's dtype
    before the product, as the reference."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * GROUP + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < GROUP
    if PREFETCH:  # the group's weights and gate scales, asked for by the first row's program only
        if row == 0:  # (LINES covers a group of 4-byte values)
            first = w_ptr + tl.program_id(1) * GROUP
            prefetch_span(first, GROUP * (w_ptr.dtype.element_ty.primitive_bitwidth // 8), LINES)
            if GATE_Q and GS_MODE == 1:
                prefetch_span(gs_ptr + tl.program_id(1) * GROUP, GROUP * 4, LINES)
    wait_for_inputs(PDL)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0).to(tl.float32)
    if GATE_Q:
        g = g * load_scale(gs_ptr, GS_MODE, row, cols, mask)
    h = y * silu(g)
    normed = h * tl.rsqrt(tl.sum(h * h, axis=0) / GROUP + eps)
    v = w.to(tl.float32) * normed.to(w_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * D + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int,
                   gate_scale: torch.Tensor | None = None, config: dict[str, int] | None = None) -> torch.Tensor | None:
    """ssmq.ops.norm.gated_rms_norm in one kernel, in weight's dtype; with `gate_scale`, gate is int8 codes
    and the gate values are codes * gate_scale (fp32; one value or one per channel). `config` overrides
    num_warps. None when the shapes or the scale layout are not ones the kernel takes (the caller runs the
    reference, which raises any error)."""
    d = y.shape[-1]
    if gate.shape != y.shape or weight.shape != (d,) or group_size < 1 or d % group_size:
        return None
    gs_mode = PER_TENSOR if gate_scale is None else scale_mode(gate_scale, gate.shape)
    if gs_mode not in (PER_TENSOR, PER_CHANNEL):
        return None
    y2, g2 = _rows(y, d), _rows(gate, d)
    out = torch.empty(y.shape, dtype=weight.dtype, device=y.device)
    if y2.shape[0]:
        block = next_pow2(group_size)
        gs = weight if gate_scale is None else flat_scale(gate_scale, y.device)
        _gated_rms_norm_kernel[(y2.shape[0], d // group_size)](
            y2, g2, gs, weight.contiguous(), out, d, group_size, y2.stride(0), g2.stride(0), eps,
            GATE_Q=gate_scale is not None, GS_MODE=gs_mode, BLOCK=block,
            num_warps=(config or {}).get("num_warps", _warps(block)), LINES=span_lines(4 * group_size),
            enable_fp_fusion=False, **prefetch_options(y.device))
    return out
