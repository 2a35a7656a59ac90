"""W8A8 linear (int8 activations x int8 weights, exact int32 accumulation) and its weight helpers.

    acc  = sum_k x_q[..., k] * w_q[n, k]                     exact, int32
    out  = fp32(acc) * (x_scale * w_scale) + bias            fp32, in this order
    then cast to out_dtype, or requantized: quantize(out, out_scale)

x_scale is 0-d (per tensor) or (..., 1) (per token); w_scale is 0-d or (N,) (per output channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmq.errors import SsmqError
from ssmq.ops.quantize import QMIN, ScaleLike, check_int8, check_scale, quantize, scale_from_amax

# The largest K for which an int32 accumulator cannot overflow: K * 128 * 128 <= 2^31 - 1.
MAX_K = (2 ** 31 - 1) // (QMIN * QMIN)


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulators x_q @ w_q^T for x_q (..., K) and w_q (N, K), both int8.

    Computed in float64 (torch has no int8 matmul on CPU): every product and every partial sum is an
    integer of magnitude <= K * 2^14 < 2^31 < 2^53, so each float64 addition is exact in any order.
    """
    check_int8(x_q, "x_q")
    check_int8(w_q, "w_q")
    k = x_q.shape[-1]
    if k > MAX_K:
        raise SsmqError(f"int8 matmul over K={k} could overflow its int32 accumulator (K must be <= {MAX_K})")
    return torch.matmul(x_q.double(), w_q.double().t()).to(torch.int32)


def rescale(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """The epilogue of every int8 x int8 product: fp32(acc) * (x_scale * w_scale) + bias, each step
    rounded to fp32 (two separate roundings, no fused multiply-add). Scales must be validated fp32."""
    out = acc.float() * (x_scale * w_scale)
    return out if bias is None else out + bias.float()


def int8_linear(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out_scale: ScaleLike | None = None) -> torch.Tensor:
    """W8A8 linear. Returns `out_dtype` values, or int8 codes quantize(out_fp32, out_scale) when
    `out_scale` is given (the requantization reads the fp32 value, never a rounded fp16 one)."""
    device = x_q.device
    xs = check_scale(x_scale, "x_scale").to(device)
    ws = check_scale(w_scale, "w_scale").to(device)
    out = rescale(int8_matmul(x_q, w_q), xs, ws, bias)
    if out_scale is not None:
        return quantize(out, out_scale, "out_scale")
    return out.to(out_dtype)


def weight_only_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: ScaleLike,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W8A16 linear: float activations x int8 weights, fp32 accumulation of x * codes, then the same
    epilogue as W8A8 (per-channel scale after accumulation, then bias). Output in out_dtype or x's."""
    check_int8(w_q, "w_q")
    ws = check_scale(w_scale, "w_scale").to(x.device)
    out = F.linear(x.float(), w_q.float()) * ws
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Abs-max int8 weights for w (N, K). Returns (codes (N, K) int8, fp32 scale of shape (N,)
    per output channel, or 0-d per tensor)."""
    a = w.detach().float().abs()
    if per_channel:
        scale = scale_from_amax(a.amax(dim=-1))
        return quantize(w, scale[:, None], "w_scale"), scale
    scale = scale_from_amax(a.amax())
    return quantize(w, scale, "w_scale"), scale

