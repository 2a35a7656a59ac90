"""Mamba1 selective-scan kernels (ssmq.ops.scan.selective_scan, ssmq.ops.int8_scan.int8_selective_scan).

Per channel d and state index n, with dt = softplus(delta + delta_bias):
    h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * u[t] * B[t, n]
    y[t] = (sum_n C[t, n] * h[t, n] + D[d] * u[t]) * silu(z[t])

Prefill: one program per (channel block, sequence) holds its (channels x d_state) state in fp32 and walks
the sequence in chunks of T steps. Inside a chunk every step's decay and input are computed at once and
the recurrence is an associative scan over the chunk (pairs (a, b) compose as (a1 a2, a2 b1 + b2)); the
chunk's last state carries into the next. Decoding: one step per call, the state read, advanced and
written back (in place when the caller allows it). On int8 inputs every operand is dequantized as the
reference does (fp32(code) * scale) and the final state is requantized once, at the end of the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ssmq.ops.triton.common import flat_scale, next_pow2, pdl_options, quantize_rn, silu, softplus, wait_for_inputs

PREFILL_CONFIG = dict(BLOCK_D=4, T=16, num_warps=1)  # the fastest of those timed on an H100 (gpu_check.py)


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _load_tile(ptr, scale_ptr, rows, cols, mask, IS_INT: tl.constexpr):
    """fp32 values of a tile: codes dequantized with a per-tensor scale, or floats converted."""
    v = tl.load(ptr + rows + cols, mask=mask, other=0)
    if IS_INT:
        return v.to(tl.float32) * tl.load(scale_ptr)
    return v.to(tl.float32)


@triton.jit
def _scan_prefill_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, h0_ptr, y_ptr, hT_ptr,
                         us_ptr, ds_ptr, Bs_ptr, Cs_ptr, zs_ptr, hs_ptr, L, DIM, N,
                         s_ub, s_ul, s_db, s_dl, s_Bb, s_Bl, s_Cb, s_Cl, s_zb, s_zl, s_yb, s_yl, s_hb,
                         IS_INT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STATE_INT: tl.constexpr,
                         BLOCK_D: tl.constexpr, NP: tl.constexpr, T: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    dmask = d < DIM
    dn_mask = dmask[:, None] & (n < N)[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    if HAS_H0:
        h = _load_tile(h0_ptr + b * s_hb, hs_ptr, d[:, None] * N, n[None, :], dn_mask, STATE_INT)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    if HAS_DBIAS:
        bias = tl.load(db_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    steps = tl.arange(0, T)
    first = (steps == 0)[None, None, :]
    last = (steps == T - 1)[None, None, :]
    for c0 in range(0, L, T):
        t = c0 + steps
        tmask = t < L
        m_dt = dmask[:, None] & tmask[None, :]
        m_nt = (n < N)[:, None] & tmask[None, :]
        u = _load_tile(u_ptr + b * s_ub, us_ptr, d[:, None], t[None, :] * s_ul, m_dt, IS_INT)
        dt = _load_tile(dl_ptr + b * s_db, ds_ptr, d[:, None], t[None, :] * s_dl, m_dt, IS_INT)
        if HAS_DBIAS:
            dt = dt + bias[:, None]
        if SOFTPLUS:
            dt = softplus(dt)
        Bt = _load_tile(B_ptr + b * s_Bb, Bs_ptr, n[:, None], t[None, :] * s_Bl, m_nt, IS_INT)
        Ct = _load_tile(C_ptr + b * s_Cb, Cs_ptr, n[:, None], t[None, :] * s_Cl, m_nt, IS_INT)
        dA = tl.exp(dt[:, None, :] * A[:, :, None])
        dBu = (dt * u)[:, None, :] * Bt[None, :, :]
        valid = tmask[None, None, :]
        dA = tl.where(valid, dA, 1.0)
        dBu = tl.where(valid, dBu, 0.0)
        dBu = tl.where(first, dBu + dA * h[:, :, None], dBu)
        _, H = tl.associative_scan((dA, dBu), 2, _combine)
        y = tl.sum(H * Ct[None, :, :], axis=1)
        h = tl.sum(tl.where(last, H, 0.0), axis=2)
        if HAS_D:
            y = y + u * Dv[:, None]
        if HAS_Z:
            y = y * silu(_load_tile(z_ptr + b * s_zb, zs_ptr, d[:, None], t[None, :] * s_zl, m_dt, IS_INT))
        tl.store(y_ptr + b * s_yb + t[None, :] * s_yl + d[:, None], y.to(y_ptr.dtype.element_ty), mask=m_dt)
    h_out = hT_ptr + b * DIM * N + d[:, None] * N + n[None, :]
    if STATE_INT:
        tl.store(h_out, quantize_rn(h, tl.load(hs_ptr)), mask=dn_mask)
    else:
        tl.store(h_out, h, mask=dn_mask)


@triton.jit
def _scan_step_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, h0_ptr, y_ptr, hT_ptr,
                      us_ptr, ds_ptr, Bs_ptr, Cs_ptr, zs_ptr, hs_ptr, DIM, N,
                      s_ub, s_db, s_Bb, s_Cb, s_zb, s_yb, s_hb, s_ob,
                      IS_INT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr,
                      SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STATE_INT: tl.constexpr,
                      BLOCK_D: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, NP)
    dmask = d < DIM
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    dn = d[:, None] * N + n[None, :]
    wait_for_inputs(PDL)
    A = tl.load(A_ptr + dn, mask=dn_mask, other=0.0).to(tl.float32)
    if HAS_H0:
        h = _load_tile(h0_ptr + b * s_hb, hs_ptr, dn, 0, dn_mask, STATE_INT)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    u = _load_tile(u_ptr + b * s_ub, us_ptr, d, 0, dmask, IS_INT)
    dt = _load_tile(dl_ptr + b * s_db, ds_ptr, d, 0, dmask, IS_INT)
    if HAS_DBIAS:
        dt = dt + tl.load(db_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    Bv = _load_tile(B_ptr + b * s_Bb, Bs_ptr, n, 0, nmask, IS_INT)
    Cv = _load_tile(C_ptr + b * s_Cb, Cs_ptr, n, 0, nmask, IS_INT)
    h = (dt * u)[:, None] * Bv[None, :] + tl.exp(dt[:, None] * A) * h
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y = y + u * tl.load(D_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_Z:
        y = y * silu(_load_tile(z_ptr + b * s_zb, zs_ptr, d, 0, dmask, IS_INT))
    tl.store(y_ptr + b * s_yb + d, y.to(y_ptr.dtype.element_ty), mask=dmask)
    tl.debug_barrier()  # every read of the old state is done before the (possibly in-place) write
    if STATE_INT:
        tl.store(hT_ptr + b * s_ob + dn, quantize_rn(h, tl.load(hs_ptr)), mask=dn_mask)
    else:
        tl.store(hT_ptr + b * s_ob + dn, h, mask=dn_mask)


def _lastdim_contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                   delta_softplus: bool, state: torch.Tensor | None, y_dtype: torch.dtype,
                   scales: dict[str, torch.Tensor] | None = None, inplace: bool = False,
                   config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan of u, delta, z (b, l, d) and B, C (b, l, n) with A (d, n), D, delta_bias (d,).

    Float inputs, or int8 codes when `scales` maps 'u', 'delta', 'B', 'C', 'z', 'state' to per-tensor
    fp32 scales (the state then comes in and goes out as int8 codes). Returns y (b, l, d) in y_dtype and
    the final state (b, d, n): fp32, or int8 codes. With `inplace` and l == 1 the new state is written
    over `state` (which must then be contiguous in (d, n))."""
    batch, length, dim = u.shape
    n = A.shape[1]
    is_int = scales is not None
    u, delta, B, C, z = (_lastdim_contig(t) for t in (u, delta, B, C, z))
    A = A.float().contiguous()
    dev = u.device
    state_dtype = torch.int8 if is_int else torch.float32
    if state is not None and (state.dtype != state_dtype or state.stride()[1:] != (n, 1)):
        state, inplace = state.to(state_dtype).contiguous(), False
    y = torch.empty(batch, length, dim, device=dev, dtype=y_dtype)
    step = length == 1
    h_out = state if (inplace and step and state is not None) else torch.empty(batch, dim, n, device=dev,
                                                                                  dtype=state_dtype)
    if batch == 0 or dim == 0:
        return y, h_out
    if length == 0:
        return y, (state.clone() if state is not None else h_out.zero_())
    dummy = A  # stands in for absent tensors: the kernel never reads it (no host-to-device copy, which a
    # CUDA graph capture forbids)
    s = scales or {}
    sc = [flat_scale(s[k], dev) if k in s else dummy for k in ("u", "delta", "B", "C", "z", "state")]
    ptrs = (u, delta, A, B, C, D if D is not None else dummy, z if z is not None else u,
            delta_bias if delta_bias is not None else dummy, state if state is not None else h_out, y, h_out, *sc)
    flags = dict(IS_INT=is_int, HAS_D=D is not None, HAS_Z=z is not None, HAS_DBIAS=delta_bias is not None,
                 SOFTPLUS=delta_softplus, HAS_H0=state is not None, STATE_INT=is_int, NP=max(next_pow2(n), 2))
    zt = z if z is not None else u
    if step:
        block_d = min(32, next_pow2(dim))
        _scan_step_kernel[(triton.cdiv(dim, block_d), batch)](
            *ptrs, dim, n, u.stride(0), delta.stride(0), B.stride(0), C.stride(0), zt.stride(0), y.stride(0),
            ptrs[8].stride(0), h_out.stride(0), **flags, BLOCK_D=block_d, num_warps=2, **pdl_options(dev))
    else:
        cfg = dict(PREFILL_CONFIG, **(config or {}))
        block_d = min(cfg["BLOCK_D"], next_pow2(dim))
        _scan_prefill_kernel[(triton.cdiv(dim, block_d), batch)](
            *ptrs, length, dim, n, u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0),
            B.stride(1), C.stride(0), C.stride(1), zt.stride(0), zt.stride(1), y.stride(0), y.stride(1),
            ptrs[8].stride(0), **flags, BLOCK_D=block_d, T=cfg["T"], num_warps=cfg["num_warps"])
    return y, h_out
