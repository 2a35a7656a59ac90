"""State-space scans on int8 inputs: dequantize, run the fp32 reference recurrence, quantize the state.

Each int8 input comes with its own scale (any shape that broadcasts against its codes). A, D and the
dt bias stay fp32 parameters: they are tiny and exact floats cost nothing. Inside one call the
recurrence runs entirely in fp32 (ssmq.ops.scan); only the final state is stored as int8 codes, with
the `ssm.state` scale, and an initial state is given the same way. So a decoding step dequantizes the
state, advances one token and requantizes it: the state is requantized once per call, which makes L
one-token calls differ (by the state's rounding) from one prefill of L tokens.
"""

from __future__ import annotations

import torch

from ssmq.ops.quantize import ScaleLike, dequantize, quantize
from ssmq.ops.scan import selective_scan, ssd_scan


def int8_selective_scan(u_q: torch.Tensor, u_scale: ScaleLike, delta_q: torch.Tensor, delta_scale: ScaleLike,
                        A: torch.Tensor, B_q: torch.Tensor, B_scale: ScaleLike, C_q: torch.Tensor,
                        C_scale: ScaleLike, state_scale: ScaleLike, *, D: torch.Tensor | None = None,
                        z_q: torch.Tensor | None = None, z_scale: ScaleLike | None = None,
                        delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                        state_q: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan on int8 u, delta (before bias), B, C and z (codes (b, l, d) or (b, l, n)).

    A: (d, n) fp32; D, delta_bias: (d,) fp32; state_q: (b, d, n) int8 or None for zeros; state_scale
    broadcasts against (b, d, n). Returns y (b, l, d) in out_dtype (gated by silu(z) when z is given)
    and the final state as int8 codes quantize(h, state_scale).
    """
    z = None if z_q is None else dequantize(z_q, z_scale, "z_scale")
    h0 = None if state_q is None else dequantize(state_q, state_scale, "state_scale")
    y, h = selective_scan(dequantize(u_q, u_scale, "u_scale"), dequantize(delta_q, delta_scale, "delta_scale"),
                          A.float(), dequantize(B_q, B_scale, "B_scale"), dequantize(C_q, C_scale, "C_scale"),
                          D, z, delta_bias, delta_softplus, h0)
    return y.to(out_dtype), quantize(h, state_scale, "state_scale")


def int8_ssd_scan(x_q: torch.Tensor, x_scale: ScaleLike, dt: torch.Tensor, A: torch.Tensor, B_q: torch.Tensor,
                  B_scale: ScaleLike, C_q: torch.Tensor, C_scale: ScaleLike, state_scale: ScaleLike,
                  chunk_size: int, *, dt_scale: ScaleLike | None = None, D: torch.Tensor | None = None,
                  dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
                  dt_limit: tuple[float, float] = (0.0, float("inf")), state_q: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's SSD scan on int8 x (b, l, heads, headdim) and B, C (b, l, groups, d_state).

    Grouped scales are passed expanded to something that broadcasts against the codes: x_scale e.g.
    (heads, headdim) or (heads, 1); B_scale, C_scale e.g. (groups, 1); state_scale against
    (b, heads, headdim, d_state), e.g. (heads, headdim, d_state). dt (b, l, heads) is float, or int8
    codes when dt_scale is given. A, D, dt_bias: (heads,) fp32. Returns y (b, l, heads, headdim) in
    out_dtype and the final state as int8 codes quantize(S, state_scale).
    """
    dt_f = dt if dt_scale is None else dequantize(dt, dt_scale, "dt_scale")
    h0 = None if state_q is None else dequantize(state_q, state_scale, "state_scale")
    y, h = ssd_scan(dequantize(x_q, x_scale, "x_scale"), dt_f, A.float(), dequantize(B_q, B_scale, "B_scale"),
                    dequantize(C_q, C_scale, "C_scale"), chunk_size, D, dt_bias, dt_softplus, dt_limit, h0)
    return y.to(out_dtype), quantize(h, state_scale, "state_scale")
