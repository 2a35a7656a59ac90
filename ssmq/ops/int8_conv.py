"""Causal depthwise conv1d on int8 codes (Mamba's conv1d + SiLU, quantized to the `conv.out` scale).

    acc[t, c] = sum_j w_q[c, j] * x_q[t - (k-1) + j, c]          exact, int32 (|acc| <= k * 2^14)
    pre       = fp32(acc) * (x_scale * w_scale) + bias           fp32, in this order
    out       = quantize(silu(pre), out_scale)                    int8

The state is the previous k - 1 *input codes* (b, k-1, c), zeros at the start of a sequence. Since it
holds codes, not values, a prefill and any split of it into shorter calls (down to one-token decoding
steps) give identical codes and states; this needs x_scale to be static (the same for every call).
The one-token update is the same call with length 1: new_state = cat(state[:, 1:], x_q).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssmq.ops.int8_linear import rescale
from ssmq.ops.quantize import ScaleLike, check_int8, check_scale, quantize


def int8_causal_conv1d(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                       bias: torch.Tensor | None = None,
                       state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv without activation: returns (pre-activation fp32 (b, l, c), new int8 state (b, k-1, c)).

    x_q: (b, l, c) int8; x_scale: 0-d or (c,) (Mamba2's x|B|C segments each have their own);
    w_q: (c, k) int8; w_scale: 0-d or (c,); bias: (c,) float or None; state: (b, k-1, c) int8 or None.
    """
    check_int8(x_q, "x_q")
    check_int8(w_q, "w_q")
    batch, length, channels = x_q.shape
    k = w_q.shape[-1]
    if state is None:
        state = x_q.new_zeros(batch, k - 1, channels)
    check_int8(state, "conv state")
    padded = torch.cat([state, x_q], dim=1)
    wide, w = padded.to(torch.int32), w_q.to(torch.int32)
    acc = wide[:, 0:length] * w[:, 0]
    for j in range(1, k):
        acc = acc + wide[:, j:j + length] * w[:, j]
    xs = check_scale(x_scale, "x_scale").to(x_q.device)
    ws = check_scale(w_scale, "w_scale").to(x_q.device)
    return rescale(acc, xs, ws, bias), padded[:, padded.shape[1] - (k - 1):].clone()


def int8_causal_conv1d_silu(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                            bias: torch.Tensor | None, out_scale: ScaleLike,
                            state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv + SiLU (fp32) + quantization to out_scale (0-d or (c,)). Returns (int8 codes (b, l, c),
    new int8 state (b, k-1, c)); see int8_causal_conv1d for the other arguments."""
    pre, new_state = int8_causal_conv1d(x_q, x_scale, w_q, w_scale, bias, state)
    return quantize(F.silu(pre), out_scale, "out_scale"), new_state
