"""Mamba2 SSD-scan kernels (ssmq.ops.scan.ssd_scan, ssmq.ops.int8_scan.int8_ssd_scan), float or int8 inputs.

Per head h (group g = h // (heads / groups)), with dt = clamp(softplus(dt + dt_bias), dt_limit):
    S[t] = exp(dt[t] A[h]) S[t-1] + dt[t] x[t] B[t]^T          (S: headdim x d_state, fp32)
    y[t] = S[t] C[t] + D[h] x[t]

Prefill: one program per (headdim block, head, sequence) holds its block of S in fp32 and walks the
sequence in chunks of T steps. Per chunk, with cum the in-chunk cumulative sum of dt A:
    y     = ((C B^T) * exp(cum_t - cum_s) * dt_s, causal) @ x  +  exp(cum_t) * (C @ S^T)   (+ D x)
    S_new = exp(cum_end) S + x^T @ (exp(cum_end - cum_s) dt_s B)
four tensor-core products per chunk. Int8 codes stay integers inside them (C B^T is an int8 product
summed exactly in int32; x, B, C codes are exact in fp16) and their scales, which must be constant along
the sequence (and, for B and C, along d_state), are applied after each product. In the other three
products one operand is derived in fp32 (the masked decay scores, the state, the decay-weighted B) and
rounded to fp16 for the MMA: a few 1e-4 of relative error in y and in a float state, within the 1e-3
float tolerance. An int8 final state must match the reference's codes, which one fp16 rounding does not
give (it flips a few percent of them), so on int8 inputs the decay-weighted B is split into an fp16 high
part and an fp16 remainder (two MMAs, about 22 bits). fp32 inputs use fp32 products.
The fp16 and int8 paths are one kernel, with the same tiles.

Decoding: one token per call, one program per (headdim block, head, sequence); the state is read,
advanced and written back (in place when the caller allows it). On int8 inputs every operand is
dequantized as the reference does and the final state is requantized once, at the end of the call.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ssmq.ops.triton.common import next_pow2, pdl_options, quantize_rn, softplus, wait_for_inputs

# the fewest register spills of the tiles compiled for sm_90 (ptxas -v); not yet timed on a GPU
PREFILL_CONFIG = dict(BLOCK_P=32, T=64, num_warps=8, num_stages=2)
# decoding step (channels of a head per program, warps), by state type. int8 states: 8 channels and 4 warps,
# the fastest in whole-model decoding (gpu_check's ab stage on an H200, mamba2-8b quamba2-w4a8: 2.223 ms
# per token against 2.258 with 16 channels, 2.384 with 32, 2.264 with 8 channels and 2 warps); fp32 states:
# 16 channels and 2 warps (fp16 model times within their spread for all of those)
STEP_CONFIG = {"fp32": dict(BLOCK_P=16, num_warps=2), "int8": dict(BLOCK_P=8, num_warps=4)}


@triton.jit
def _split16(v):
    """fp32 v as two fp16 parts, hi + lo, together exact to about 22 bits."""
    hi = v.to(tl.float16)
    return hi, (v - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _dot_split(a, b, DERIVED_A: tl.constexpr, SPLIT: tl.constexpr, FP32: tl.constexpr):
    """a @ b in fp32, where one operand is a derived fp32 value (`a` when DERIVED_A, else `b`) and the
    other is exact in fp16 (or both are fp32, when FP32). The derived one is rounded to fp16, or with
    SPLIT taken as two fp16 parts (two MMAs, ~22 bits)."""
    if FP32:
        out = tl.dot(a, b, input_precision="ieee")
    elif not SPLIT:
        if DERIVED_A:
            out = tl.dot(a.to(tl.float16), b)
        else:
            out = tl.dot(a, b.to(tl.float16))
    elif DERIVED_A:
        hi, lo = _split16(a)
        out = tl.dot(lo, b, tl.dot(hi, b))
    else:
        hi, lo = _split16(b)
        out = tl.dot(a, lo, tl.dot(a, hi))
    return out


@triton.jit
def _dt(dt_ptr, dts_ptr, db_ptr, h, offs, soffs, mask, dt_min, dt_max, DT_INT: tl.constexpr,
        HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """The discretisation step of head h at the given offsets (0 where masked), as discretize_dt."""
    v = tl.load(dt_ptr + offs, mask=mask, other=0).to(tl.float32)
    if DT_INT:
        v = v * tl.load(dts_ptr + soffs, mask=mask, other=1.0)
    if HAS_DBIAS:
        v = v + tl.load(db_ptr + h).to(tl.float32)
    if SOFTPLUS:
        v = softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, dt_min), dt_max)
    return tl.where(mask, v, 0.0)


@triton.jit
def _ssd_prefill_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, db_ptr, h0_ptr, y_ptr, hT_ptr,
                        xs_ptr, dts_ptr, Bs_ptr, Cs_ptr, hs_ptr, L, P, N, REP, dt_min, dt_max,
                        s_xb, s_xl, s_xh, s_tb, s_tl, s_th, s_Bb, s_Bl, s_Bg, s_Cb, s_Cl, s_Cg, s_yb, s_yl, s_yh,
                        s_xsb, s_xsh, s_xsp, s_dsb, s_dsl, s_dsh, s_Bsb, s_Bsg, s_Csb, s_Csg,
                        s_hsb, s_hsh, s_hsp, s_hsn,
                        IS_INT: tl.constexpr, DT_INT: tl.constexpr, HAS_D: tl.constexpr, HAS_DBIAS: tl.constexpr,
                        SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_H0: tl.constexpr, FP32: tl.constexpr,
                        SPLIT_Y: tl.constexpr, SPLIT_S: tl.constexpr, EVEN_P: tl.constexpr, EVEN_N: tl.constexpr,
                        BLOCK_P: tl.constexpr, NP: tl.constexpr, T: tl.constexpr):
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(1)
    g = h // REP
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, NP)
    tt = tl.arange(0, T)
    pmask = p < P
    nmask = n < N
    pn_mask = pmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + h).to(tl.float32)
    hs_offs = b * s_hsb + h * s_hsh + p[:, None] * s_hsp + n[None, :] * s_hsn
    state_offs = ((b * heads + h) * P + p[:, None]) * N + n[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + state_offs, mask=pn_mask, other=0).to(tl.float32)
        if IS_INT:
            S = S * tl.load(hs_ptr + hs_offs, mask=pn_mask, other=1.0)
    else:
        S = tl.zeros((BLOCK_P, NP), dtype=tl.float32)
    if IS_INT:
        xs = tl.load(xs_ptr + b * s_xsb + h * s_xsh + p * s_xsp, mask=pmask, other=1.0)
        bcs = tl.load(Bs_ptr + b * s_Bsb + g * s_Bsg) * tl.load(Cs_ptr + b * s_Csb + g * s_Csg)
        cs = tl.load(Cs_ptr + b * s_Csb + g * s_Csg)
        bs = tl.load(Bs_ptr + b * s_Bsb + g * s_Bsg)
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    causal = tt[:, None] >= tt[None, :]
    x_base = x_ptr + b * s_xb + h * s_xh
    B_base = B_ptr + b * s_Bb + g * s_Bg
    C_base = C_ptr + b * s_Cb + g * s_Cg
    for c0 in range(0, L, T):
        t = c0 + tt
        tmask = t < L
        dt = _dt(dt_ptr, dts_ptr, db_ptr, h, b * s_tb + t * s_tl + h * s_th, b * s_dsb + t * s_dsl + h * s_dsh,
                 tmask, dt_min, dt_max, DT_INT, HAS_DBIAS, SOFTPLUS, HAS_LIMIT)
        cum = tl.cumsum(dt * A, axis=0)
        cum_end = tl.sum(dt * A, axis=0)
        # masks that do not vary along a tile's contiguous axis, where the shapes allow it, so that loads
        # and stores stay vectorized
        tn_mask = tmask[:, None] if EVEN_N else tmask[:, None] & nmask[None, :]
        nt_mask = tmask[None, :] if EVEN_N else nmask[:, None] & tmask[None, :]
        tp_mask = tmask[:, None] if EVEN_P else tmask[:, None] & pmask[None, :]
        Ct = tl.load(C_base + t[:, None] * s_Cl + n[None, :], mask=tn_mask, other=0)
        xt = tl.load(x_base + t[:, None] * s_xl + p[None, :], mask=tp_mask, other=0)
        if IS_INT:
            xo, Co = xt.to(tl.float16), Ct.to(tl.float16)  # codes are exact in fp16
        else:
            xo, Co = xt, Ct
        # the carried state's part of y, then the state carried to the chunk's end (each tile is dropped as
        # soon as it is used: the kernel is register bound)
        y = _dot_split(Co, tl.trans(S), False, SPLIT_Y, FP32) * tl.exp(cum)[:, None]  # (T, BLOCK_P): C @ S^T
        if IS_INT:
            y = y * cs
        Bt = tl.load(B_base + t[:, None] * s_Bl + n[None, :], mask=tn_mask, other=0)
        wB = Bt.to(tl.float32) * (tl.exp(cum_end - cum) * dt)[:, None]
        S_in = _dot_split(tl.trans(xo), wB, False, SPLIT_S, FP32)  # (BLOCK_P, NP): x^T @ wB
        if IS_INT:
            S_in = S_in * (xs[:, None] * bs)
        S = S * tl.exp(cum_end) + S_in
        # the chunk's own part of y
        BtT = tl.load(B_base + t[None, :] * s_Bl + n[:, None], mask=nt_mask, other=0)  # (NP, T), for C B^T
        if FP32:
            cb = tl.dot(Ct, BtT, input_precision="ieee")
        elif IS_INT:
            cb = tl.dot(Ct, BtT, out_dtype=tl.int32).to(tl.float32) * bcs
        else:
            cb = tl.dot(Ct, BtT)
        seg = tl.where(causal, cum[:, None] - cum[None, :], 0.0)
        scores = tl.where(causal, cb * tl.exp(seg) * dt[None, :], 0.0)
        y_in = _dot_split(scores, xo, True, SPLIT_Y, FP32)
        if IS_INT:
            y_in = y_in * xs[None, :]
        y = y_in + y
        if HAS_D:
            xf = xo.to(tl.float32)
            if IS_INT:
                xf = xf * xs[None, :]
            y = y + xf * Dh
        tl.store(y_ptr + b * s_yb + t[:, None] * s_yl + h * s_yh + p[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=tp_mask)
    if IS_INT:
        tl.store(hT_ptr + state_offs, quantize_rn(S, tl.load(hs_ptr + hs_offs, mask=pn_mask, other=1.0)),
                 mask=pn_mask)
    else:
        tl.store(hT_ptr + state_offs, S, mask=pn_mask)


@triton.jit
def _ssd_step_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, db_ptr, h0_ptr, y_ptr, hT_ptr,
                     xs_ptr, dts_ptr, Bs_ptr, Cs_ptr, hs_ptr, P, N, REP, dt_min, dt_max,
                     s_xb, s_xh, s_tb, s_th, s_Bb, s_Bg, s_Cb, s_Cg, s_yb, s_yh,
                     s_xsb, s_xsh, s_xsp, s_dsb, s_dsh, s_Bsb, s_Bsg, s_Csb, s_Csg,
                     s_hsb, s_hsh, s_hsp, s_hsn,
                     IS_INT: tl.constexpr, DT_INT: tl.constexpr, HAS_D: tl.constexpr, HAS_DBIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_H0: tl.constexpr,
                     HS_ROW: tl.constexpr, BLOCK_P: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr):
    """One decoding step of BLOCK_P channels of one head. HS_ROW: the state scale is constant along the
    head's channels (Quamba2's (group, state index) layout), so one row of it is loaded and broadcast."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    heads = tl.num_programs(1)
    g = h // REP
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, NP)
    pmask = p < P
    nmask = n < N
    pn_mask = pmask[:, None] & nmask[None, :]
    state_offs = ((b * heads + h) * P + p[:, None]) * N + n[None, :]
    wait_for_inputs(PDL)
    if IS_INT:
        if HS_ROW:
            hs = tl.broadcast_to(tl.load(hs_ptr + b * s_hsb + h * s_hsh + n * s_hsn, mask=nmask, other=1.0)[None, :],
                                 (BLOCK_P, NP))
        else:
            hs = tl.load(hs_ptr + b * s_hsb + h * s_hsh + p[:, None] * s_hsp + n[None, :] * s_hsn, mask=pn_mask,
                         other=1.0)
    if HAS_H0:
        S = tl.load(h0_ptr + state_offs, mask=pn_mask, other=0).to(tl.float32)
        if IS_INT:
            S = S * hs
    else:
        S = tl.zeros((BLOCK_P, NP), dtype=tl.float32)
    dt = _dt(dt_ptr, dts_ptr, db_ptr, h, b * s_tb + h * s_th, b * s_dsb + h * s_dsh, True, dt_min, dt_max,
             DT_INT, HAS_DBIAS, SOFTPLUS, HAS_LIMIT)
    x = tl.load(x_ptr + b * s_xb + h * s_xh + p, mask=pmask, other=0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_Bb + g * s_Bg + n, mask=nmask, other=0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_Cb + g * s_Cg + n, mask=nmask, other=0).to(tl.float32)
    if IS_INT:
        x = x * tl.load(xs_ptr + b * s_xsb + h * s_xsh + p * s_xsp, mask=pmask, other=1.0)
        Bv = Bv * tl.load(Bs_ptr + b * s_Bsb + g * s_Bsg)
        Cv = Cv * tl.load(Cs_ptr + b * s_Csb + g * s_Csg)
    S = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32)) * S + (dt * x)[:, None] * Bv[None, :]
    y = tl.sum(S * Cv[None, :], axis=1)
    if HAS_D:
        y = y + x * tl.load(D_ptr + h).to(tl.float32)
    tl.store(y_ptr + b * s_yb + h * s_yh + p, y.to(y_ptr.dtype.element_ty), mask=pmask)
    tl.debug_barrier()  # every read of the old state is done before the (possibly in-place) write
    if IS_INT:
        tl.store(hT_ptr + state_offs, quantize_rn(S, hs), mask=pn_mask)
    else:
        tl.store(hT_ptr + state_offs, S, mask=pn_mask)


def _lastdim_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _spread(scale: torch.Tensor, shape: tuple[int, ...], constant: tuple[int, ...]) -> torch.Tensor | None:
    """`scale` broadcast (a view, no copy) to `shape`; None when it does not broadcast, or varies along a
    dimension of `constant` (those the kernels assume it constant along) of size > 1."""
    try:
        view = torch.broadcast_to(scale, shape)
    except RuntimeError:
        return None
    if any(shape[d] > 1 and view.stride(d) != 0 for d in constant):
        return None
    return view


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor | None, dt_bias: torch.Tensor | None, dt_softplus: bool,
             dt_limit: tuple[float, float], state: torch.Tensor | None, y_dtype: torch.dtype,
             scales: dict[str, torch.Tensor] | None = None, inplace: bool = False,
             config: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SSD scan of x (b, l, heads, headdim), dt (b, l, heads), B, C (b, l, groups, d_state), A, D, dt_bias
    (heads,), state (b, heads, headdim, d_state) or None.

    x, B, C are fp16 or fp32 (state fp32), or int8 codes when `scales` maps 'x', 'B', 'C', 'state' (and 'dt'
    for int8 dt) to fp32 scales broadcasting against their codes: the state then comes in and goes out as
    int8 codes. Returns y (b, l, heads, headdim) in y_dtype and the final state: fp32, or int8 codes. With
    `inplace` and l == 1 the new state is written over `state`. `config` overrides the prefill tiles
    (BLOCK_P, T, num_warps, num_stages) and the split products (SPLIT_Y, SPLIT_S; see the module
    docstring), or for one step (l == 1) the STEP_CONFIG tiles (BLOCK_P, num_warps). Returns None when a
    scale varies where the kernels need it constant (x's along the sequence, B's and C's along the
    sequence or d_state) or a layout is one they don't take (the caller falls back to the reference)."""
    batch, length, heads, headdim = x.shape
    groups, n = B.shape[2], B.shape[3]
    if length == 0 or heads % groups or C.shape != B.shape or dt.shape != (batch, length, heads):
        return None  # (nothing to scan: the reference's (re)quantization of the state is the answer)
    is_int = scales is not None
    fp32 = not is_int and torch.float32 in (x.dtype, B.dtype, C.dtype)
    if not is_int and fp32:
        x, B, C = x.float(), B.float(), C.float()
    elif not is_int and not (x.dtype == B.dtype == C.dtype == torch.float16):
        return None
    dev = x.device
    s = scales or {}
    view = {}
    if is_int:
        view["x"] = _spread(s["x"], (batch, length, heads, headdim), (1,))
        view["B"] = _spread(s["B"], (batch, length, groups, n), (1, 3))
        view["C"] = _spread(s["C"], (batch, length, groups, n), (1, 3))
        view["state"] = _spread(s["state"], (batch, heads, headdim, n), ())
        if any(v is None for v in view.values()):
            return None
    dt_int = "dt" in s
    if dt_int:
        view["dt"] = _spread(s["dt"], (batch, length, heads), ())
        if view["dt"] is None:
            return None
    x, dt, B, C = (_lastdim_contig(t) for t in (x, dt, B, C))
    A = A.float().contiguous()
    state_dtype = torch.int8 if is_int else torch.float32
    if state is not None and (state.dtype != state_dtype or not state.is_contiguous()):
        state, inplace = state.to(state_dtype).contiguous(), False
    y = torch.empty(batch, length, heads, headdim, device=dev, dtype=y_dtype)
    step = length == 1
    h_out = state if (inplace and step and state is not None) else torch.empty(
        batch, heads, headdim, n, device=dev, dtype=state_dtype)
    if batch == 0 or heads == 0 or headdim == 0:
        return y, h_out
    dummy = A  # stands in for absent tensors: the kernel never reads it (no host-to-device copy, which a
    # CUDA graph capture forbids)
    zero_strides = (0, 0, 0, 0)
    xs = view.get("x")
    xs_args = (xs[:, 0], xs.stride(0), xs.stride(2), xs.stride(3)) if xs is not None else (dummy, 0, 0, 0)
    ds = view.get("dt")
    ds_args = (ds, ds.stride(0), ds.stride(1), ds.stride(2)) if ds is not None else (dummy, 0, 0, 0)
    bsv, csv = view.get("B"), view.get("C")
    bs_args = (bsv, bsv.stride(0), bsv.stride(2)) if bsv is not None else (dummy, 0, 0)
    cs_args = (csv, csv.stride(0), csv.stride(2)) if csv is not None else (dummy, 0, 0)
    hsv = view.get("state")
    hs_args = (hsv, *hsv.stride()) if hsv is not None else (dummy, *zero_strides)
    lo, hi = dt_limit
    has_limit = (lo, hi) != (0.0, math.inf)
    ptrs = (x, dt, A, B, C, D if D is not None else dummy, dt_bias if dt_bias is not None else dummy,
            state if state is not None else h_out, y, h_out, xs_args[0], ds_args[0], bs_args[0], cs_args[0],
            hs_args[0])
    flags = dict(IS_INT=is_int, DT_INT=dt_int, HAS_D=D is not None, HAS_DBIAS=dt_bias is not None,
                 SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit, HAS_H0=state is not None)
    rep = heads // groups
    limits = (float(lo), float(hi) if math.isfinite(hi) else 3.0e38)
    if step:
        cfg = {**STEP_CONFIG["int8" if is_int else "fp32"], **(config or {})}
        block_p = min(cfg["BLOCK_P"], next_pow2(headdim))
        _ssd_step_kernel[(triton.cdiv(headdim, block_p), heads, batch)](
            *ptrs, headdim, n, rep, *limits, x.stride(0), x.stride(2), dt.stride(0), dt.stride(2), B.stride(0),
            B.stride(2), C.stride(0), C.stride(2), y.stride(0), y.stride(2), *xs_args[1:], ds_args[1],
            ds_args[3], *bs_args[1:], *cs_args[1:], *hs_args[1:], **flags, HS_ROW=hs_args[3] == 0,
            BLOCK_P=block_p, NP=max(next_pow2(n), 2), num_warps=cfg["num_warps"], **pdl_options(dev))
    else:
        cfg = {**PREFILL_CONFIG, "SPLIT_Y": False, "SPLIT_S": is_int, **(config or {})}
        block_p = max(16, min(cfg["BLOCK_P"], next_pow2(headdim)))
        np_ = max(next_pow2(n), 16)
        _ssd_prefill_kernel[(triton.cdiv(headdim, block_p), heads, batch)](
            *ptrs, length, headdim, n, rep, *limits, x.stride(0), x.stride(1), x.stride(2), dt.stride(0),
            dt.stride(1), dt.stride(2), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1),
            C.stride(2), y.stride(0), y.stride(1), y.stride(2), *xs_args[1:], *ds_args[1:], *bs_args[1:],
            *cs_args[1:], *hs_args[1:], **flags, FP32=fp32, EVEN_P=headdim % block_p == 0, EVEN_N=n == np_,
            BLOCK_P=block_p, NP=np_, T=cfg["T"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            SPLIT_Y=cfg["SPLIT_Y"], SPLIT_S=cfg["SPLIT_S"])
    return y, h_out
