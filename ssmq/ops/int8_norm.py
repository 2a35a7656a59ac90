"""Fused residual add + RMSNorm + quantization: the input side of every block (and of lm_head).

    residual = residual + hidden          (fp32 add; hidden alone for the first block)
    residual -> stored in fp32 when residual_in_fp32, else in hidden's dtype
    normed   = rms_norm(stored residual)  (fp32: weight * r / sqrt(mean(r^2) + eps))
    codes    = quantize(normed, out_scale)

The norm reads the residual as stored (with residual_in_fp32=False that is the sum rounded to hidden's
dtype, as in the float model's Block), and the normed value is quantized from fp32, never rounded to
fp16 first, whatever the dtype of `weight`.
"""

from __future__ import annotations

import torch

from ssmq.ops.norm import rms_norm
from ssmq.ops.quantize import ScaleLike, quantize


def int8_add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      out_scale: ScaleLike, residual_in_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden, residual: (..., d); weight: (d,). Returns (int8 normed codes (..., d), new residual).
    out_scale is 0-d (the `norm.out` scale) or anything broadcastable, e.g. (d,)."""
    total = hidden.float() if residual is None else residual.float() + hidden.float()
    stored = total if residual_in_fp32 else total.to(hidden.dtype)
    normed = rms_norm(stored, weight.float(), eps)
    return quantize(normed, out_scale, "out_scale"), stored
