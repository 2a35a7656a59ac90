"""State-space scans, the reference (float) versions: the specification the fast kernels must match.

Both scans take an initial state and return the final one, so a prefill, a chunked prefill and a
one-token decoding step are the same call. All arithmetic is fp32, whatever the input dtype.

Layouts are channels-last: (batch, length, channels), as the taps see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCAN_BLOCK = 128  # time steps whose discretised A and B*u are materialised at once (bounds memory)


def discretize_dt(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool,
                  limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """The step size as the scans use it: softplus(dt + bias), clamped to `limit`, in fp32."""
    dt = dt.float()
    if bias is not None:
        dt = dt + bias.float()
    if softplus:
        dt = F.softplus(dt)
    if limit != (0.0, float("inf")):
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan.

    For each channel d and state index n, with dt = softplus(delta + delta_bias):
        h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * u[t]
        y[t] = sum_n C[t, n] * h[t, n] + D * u[t],   then y *= silu(z[t]) when z is given.

    u, delta, z: (b, l, d); A: (d, n); B, C: (b, l, n); D, delta_bias: (d,); state: (b, d, n).
    Returns y (b, l, d) fp32 and the final state (b, d, n) fp32.
    """
    batch, length, channels = u.shape
    dt = discretize_dt(delta, delta_bias, delta_softplus)
    A = A.float()
    uf = u.float()
    h = u.new_zeros(batch, channels, A.shape[1], dtype=torch.float32) if state is None else state.float()
    ys = []
    for start in range(0, length, SCAN_BLOCK):
        sl = slice(start, min(start + SCAN_BLOCK, length))
        dA = torch.exp(dt[:, sl, :, None] * A)
        dBu = (dt[:, sl] * uf[:, sl]).unsqueeze(-1) * B[:, sl, None, :].float()
        states = []
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBu[:, t], dA[:, t], h)
            states.append(h)
        ys.append(torch.einsum("bldn,bln->bld", torch.stack(states, dim=1), C[:, sl].float()))
    y = torch.cat(ys, dim=1) if ys else uf.new_zeros(batch, 0, channels)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y, h


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
             dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, float("inf")),
             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's state-space dual (SSD) scan, computed chunk by chunk.

    Per head h (scalar A[h]) and group g = h // (heads / groups), with dt = clamp(softplus(dt + dt_bias)):
        S[t] = exp(dt[t] * A) * S[t-1] + dt[t] * x[t] B[t]^T        (S: headdim x d_state)
        y[t] = S[t] C[t] + D * x[t]
    Inside a chunk the recurrence is unrolled into a masked (l x l) decay matrix; chunk-end states
    are carried from chunk to chunk. The result equals the step-by-step recurrence up to fp32 rounding.

    x: (b, l, heads, headdim); dt: (b, l, heads); A, D, dt_bias: (heads,); B, C: (b, l, groups, d_state);
    state: (b, heads, headdim, d_state). Returns y (b, l, heads, headdim) fp32 and the final state fp32.
    """
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    rep = heads // groups
    step = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf = x.float()
    Bh = B.float().repeat_interleave(rep, dim=2)
    Ch = C.float().repeat_interleave(rep, dim=2)
    T = max(1, min(chunk_size, length))
    pad = (-length) % T

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
        return t.view(batch, -1, T, *t.shape[2:])

    xdt = chunks(xf * step[..., None])                      # (b, c, T, h, p)
    log_decay = chunks(step * A.float())                     # (b, c, T, h); padded steps decay by 1
    Bc, Cc = chunks(Bh), chunks(Ch)                          # (b, c, T, h, n)
    cum = torch.cumsum(log_decay, dim=2)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    seg = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
    scores = torch.einsum("bcthn,bcshn->bctsh", Cc, Bc) * torch.exp(seg)
    y = torch.einsum("bctsh,bcshp->bcthp", scores, xdt)
    to_end = torch.exp(cum[:, :, -1:, :] - cum)              # decay from each step to its chunk's end
    chunk_states = torch.einsum("bcsh,bcshp,bcshn->bchpn", to_end, xdt, Bc)
    h = x.new_zeros(batch, heads, headdim, d_state, dtype=torch.float32) if state is None else state.float()
    if length == 0:  # nothing to scan: no outputs, the state passes through
        return xf.new_zeros(batch, 0, heads, headdim), h
    starts = []
    for c in range(cum.shape[1]):
        starts.append(h)
        h = torch.exp(cum[:, c, -1])[..., None, None] * h + chunk_states[:, c]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, torch.stack(starts, dim=1)) * torch.exp(cum)[..., None]
    y = y.reshape(batch, -1, heads, headdim)[:, :length]
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y, h
