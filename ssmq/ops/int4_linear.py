"""Linear layers with packed int4 weights (docs/numerics.md, "4-bit weights").

W4A16 (float activations):
    W   = code[n, k] * scale[n, k // group]                  fp32, one product per element
    out = fp32(x) @ W^T (fp32 accumulation) + bias           -> out_dtype (default: x's dtype)

W4A8 (int8 activations, two-level weight scales):
    acc_g = sum_{k in group} x_q[m, k] * code[n, k]          int32, exact
    acc   = sum_groups g[n, group] * acc_g                   int32, exact (|acc| <= K * 128 * 8 * 127)
    out   = fp32(acc) * (x_scale * s_c) + bias               fp32, in this order (as int8_linear)
    then cast to out_dtype, or requantized: quantize(out, out_scale)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmq.errors import SsmqError
from ssmq.ops.int4 import INT4_MIN, GROUP_SCALE_MAX, check_group_scale, expand_groups, groups_of, unpack_int4
from ssmq.ops.int8_linear import rescale
from ssmq.ops.quantize import QMIN, ScaleLike, check_int8, check_scale, quantize

# The largest K for which the W4A8 int32 accumulator cannot overflow: K * 128 * 8 * 127 <= 2^31 - 1.
MAX_K_W4A8 = (2 ** 31 - 1) // (-QMIN * -INT4_MIN * GROUP_SCALE_MAX)


def _check_packed(w_packed: torch.Tensor, k: int) -> None:
    if w_packed.dtype != torch.uint8:
        raise TypeError(f"w_packed must be uint8 (two int4 codes per byte), got {w_packed.dtype}")
    if w_packed.dim() != 2 or 2 * w_packed.shape[1] != k:
        raise SsmqError(f"packed int4 weight of shape {tuple(w_packed.shape)} does not match the input's "
                        f"K={k} (expected (N, {k // 2}))")


def w4a16_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W4A16 linear: x (..., K) float x packed int4 weights (N, K/2) with fp32 group scales (N, K/group).
    The fp32 summation order is not part of the contract. Output in out_dtype, default x's dtype."""
    k = x.shape[-1]
    _check_packed(w_packed, k)
    ws = check_scale(w_scale, "w_scale").to(x.device)
    if ws.dim() != 2 or ws.shape[0] != w_packed.shape[0]:
        raise SsmqError(f"w_scale of shape {tuple(ws.shape)} does not match the packed weight "
                        f"(expected ({w_packed.shape[0]}, K/group))")
    groups_of(k, ws.shape[1], "w_scale")
    w = unpack_int4(w_packed).float() * expand_groups(ws, k)
    out = F.linear(x.float(), w)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def w4a8_matmul(x_q: torch.Tensor, w_packed: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulators sum_groups g[n, grp] * sum_{k in grp} x_q[..., k] * code[n, k].

    Integer arithmetic is exact, so this equals x_q @ (g * code)^T, which the reference computes in
    float64: every product and partial sum is an integer of magnitude <= K * 130048 < 2^31 < 2^53."""
    check_int8(x_q, "x_q")
    k = x_q.shape[-1]
    _check_packed(w_packed, k)
    check_group_scale(group_scale)
    if group_scale.dim() != 2 or group_scale.shape[0] != w_packed.shape[0]:
        raise SsmqError(f"group_scale of shape {tuple(group_scale.shape)} does not match the packed weight "
                        f"(expected ({w_packed.shape[0]}, K/group))")
    groups_of(k, group_scale.shape[1], "group_scale")
    if k > MAX_K_W4A8:
        raise SsmqError(f"W4A8 matmul over K={k} could overflow its int32 accumulator (K must be <= {MAX_K_W4A8})")
    w_int = unpack_int4(w_packed).double() * expand_groups(group_scale.to(x_q.device).double(), k)
    return torch.matmul(x_q.double(), w_int.t()).to(torch.int32)


def w4a8_linear(x_q: torch.Tensor, x_scale: ScaleLike, w_packed: torch.Tensor, w_scale: ScaleLike,
                group_scale: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float16, out_scale: ScaleLike | None = None) -> torch.Tensor:
    """W4A8 linear: int8 codes x_q (..., K) with x_scale (0-d or (..., 1)), packed int4 weights (N, K/2)
    with per-row fp32 scales w_scale (N,) and integer group scales (N, K/group) in [1, 127]. Returns
    out_dtype values, or int8 codes quantize(out_fp32, out_scale) when `out_scale` is given."""
    device = x_q.device
    xs = check_scale(x_scale, "x_scale").to(device)
    ws = check_scale(w_scale, "w_scale").to(device)
    out = rescale(w4a8_matmul(x_q, w_packed, group_scale), xs, ws, bias)
    if out_scale is not None:
        return quantize(out, out_scale, "out_scale")
    return out.to(out_dtype)
