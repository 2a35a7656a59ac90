"""Elementwise quantization kernel: int8 codes of a float tensor (ssmq.ops.quantize.quantize)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton.common import flat_scale, load_scale, quantize_rn, scale_mode

BLOCK = 1024


@triton.jit
def _quantize_kernel(x_ptr, s_ptr, out_ptr, n_elem, C, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elem
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = load_scale(s_ptr, MODE, offs // C, offs % C, mask)
    tl.store(out_ptr + offs, quantize_rn(x, s), mask=mask)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """int8 codes of x (any float dtype) for a per-tensor, per-channel or per-row scale; None when the
    scale's layout is one the kernel does not take."""
    mode = scale_mode(scale, x.shape)
    if mode is None:
        return None
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n = x.numel()
    if n:
        channels = x.shape[-1] if x.dim() else 1
        _quantize_kernel[(triton.cdiv(n, BLOCK),)](x, flat_scale(scale, x.device), out, n, channels,
                                                   MODE=mode, BLOCK=BLOCK)
    return out
