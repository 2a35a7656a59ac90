"""Op dispatch: the functions the model modules call, each running a Triton kernel when its inputs are
CUDA tensors and Triton is importable, and the reference op (the specification) otherwise.

Same names and signatures as the reference ops, so a module switches by importing from here. The
choice depends only on the data (device, dtypes, scale layouts): a layout no kernel takes falls back to
the reference, never to an error. Some fused ops have no single reference function; each is defined
here by its reference composition (`causal_conv1d_silu`, `add_rms_norm`, `hadamard_quantize`,
`gated_norm_hadamard_quantize`, `w4a8_linear_conv_step`).

Decode caches: an op that updates a state (`causal_conv1d`, `int8_causal_conv1d[_silu]`,
`selective_scan`, `int8_selective_scan`, `ssd_scan`, `int8_ssd_scan`) writes the new state over the old
one in place, and returns that same tensor, when the old one was marked with `mark_static_state` and the
call is one token long.
A static cache (ssmq.bench.graphs) marks its tensors so that CUDA-graph replays read and write fixed
addresses; no other caller sees a difference.

Scales are validated (ssmq.ops.quantize.check_scale) on every eager call. Reading a CUDA scale's
validity needs a device sync, so a scale tensor is checked once per in-place version of it (views of
one buffer share that), and not while a CUDA graph is being captured (the eager warm-up call before a
capture validates them).
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ssmq.ops import conv as _conv
from ssmq.ops import hadamard as _hadamard
from ssmq.ops import int4 as _int4
from ssmq.ops import int4_linear as _int4_linear
from ssmq.ops import int8_conv as _int8_conv
from ssmq.ops import int8_embedding as _int8_embedding
from ssmq.ops import int8_linear as _int8_linear
from ssmq.ops import int8_norm as _int8_norm
from ssmq.ops import int8_scan as _int8_scan
from ssmq.ops import norm as _norm
from ssmq.ops import quantize as _quantize
from ssmq.ops import scan as _scan
from ssmq.ops.quantize import ScaleLike, check_int8, check_scale
from ssmq.ops.triton import HAS_TRITON

__all__ = [
    "add_rms_norm", "causal_conv1d", "causal_conv1d_silu", "dequant_gated_rms_norm", "dequantize",
    "gated_norm_hadamard_quantize", "gated_rms_norm", "hadamard_quantize", "hadamard_transform", "int4_embedding",
    "int8_add_rms_norm", "int8_causal_conv1d", "int8_causal_conv1d_silu", "int8_embedding", "int8_lm_head",
    "int8_linear", "int8_selective_scan", "int8_ssd_scan", "mark_static_state", "quantize", "rms_norm",
    "selective_scan", "ssd_scan", "uses_kernels", "w4a16_linear", "w4a8_linear", "w4a8_linear_conv_step",
    "weight_only_linear",
]

# reference ops with no kernel yet (dequantize, the int8 lm_head, W8A16): the dispatch is the identity
dequantize = _quantize.dequantize
int8_lm_head = _int8_embedding.int8_lm_head
weight_only_linear = _int8_linear.weight_only_linear

_FLOATS = (torch.float16, torch.float32)
_STATIC_STATE = "_ssmq_static_state"
_kernels: types.SimpleNamespace | None = None
_validated: dict[tuple, tuple[weakref.ref, int]] = {}


def _k() -> types.SimpleNamespace:
    """The kernel modules, imported on first use (so that CPU-only runs never compile anything)."""
    global _kernels
    if _kernels is None:
        from ssmq.ops.triton import conv, hadamard, linear, norm, quant, scan, ssd, w4

        _kernels = types.SimpleNamespace(conv=conv, hadamard=hadamard, linear=linear, norm=norm, quant=quant,
                                         scan=scan, ssd=ssd, w4=w4)
    return _kernels


def uses_kernels(*tensors: torch.Tensor | None) -> bool:
    """True when these inputs run on Triton kernels: every tensor given is on a CUDA device."""
    return HAS_TRITON and all(t is None or t.is_cuda for t in tensors) and any(t is not None for t in tensors)


def mark_static_state(state: torch.Tensor) -> torch.Tensor:
    """Let one-token calls update this decode-state tensor in place (see the module docstring)."""
    setattr(state, _STATIC_STATE, True)
    return state


def _inplace(state: torch.Tensor | None) -> bool:
    return state is not None and getattr(state, _STATIC_STATE, False)


def _scale(scale: ScaleLike | None, name: str, device: torch.device) -> torch.Tensor:
    """A valid fp32 scale on `device` (SsmqError naming it otherwise); see the module docstring.

    A tensor is remembered as valid by its base tensor (so a fresh view of a buffer, such as
    `weight_scale[0]`, is not checked again) until that base is modified in place or freed."""
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.device == device):
        return check_scale(scale, name).to(device)
    _check_once(scale, name, check_scale)
    return scale


def _check_once(t: torch.Tensor, name: str, check: Callable[[torch.Tensor, str], object]) -> None:
    """`check(t, name)`, skipped when it passed on this view of t's base tensor at its current in-place
    version, and while a CUDA graph is being captured (see the module docstring)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    base = t if t._base is None else t._base
    key = (check, id(base), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
    seen = _validated.get(key)
    if seen is None or seen[0]() is not base or seen[1] != base._version:
        check(t, name)
        _validated[key] = (weakref.ref(base, lambda _, key=key: _validated.pop(key, None)), base._version)


def int8_embedding(ids: torch.Tensor, codes: torch.Tensor, row_scales: torch.Tensor,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """ssmq.ops.int8_embedding.int8_embedding; on CUDA the same gather and product in torch, with the row
    scales validated once per version (the reference checks them on every call, a sync a CUDA graph
    capture cannot contain)."""
    if uses_kernels(ids, codes, row_scales):
        check_int8(codes, "embedding codes")
        scales = _scale(row_scales, "row_scales", codes.device)
        return (codes[ids].float() * scales[ids].unsqueeze(-1)).to(out_dtype)
    return _int8_embedding.int8_embedding(ids, codes, row_scales, out_dtype)


def int4_embedding(ids: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """ssmq.ops.int4.int4_embedding; on CUDA the group scales are validated once per version, so a CUDA
    graph capture of a step that embeds tokens holds no host sync."""
    if uses_kernels(ids, packed, scale):
        return _int4.gather_int4_rows(ids, packed, _scale(scale, "embedding row scales", packed.device), out_dtype)
    return _int4.int4_embedding(ids, packed, scale, out_dtype)


def quantize(x: torch.Tensor, scale: ScaleLike, name: str = "scale") -> torch.Tensor:
    """ssmq.ops.quantize.quantize."""
    if uses_kernels(x) and x.dtype in _FLOATS:
        out = _k().quant.quantize(x, _scale(scale, name, x.device))
        if out is not None:
            return out
    return _quantize.quantize(x, scale, name)


def int8_linear(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out_scale: ScaleLike | None = None, constant_weights: bool = False) -> torch.Tensor:
    """ssmq.ops.int8_linear.int8_linear. `constant_weights`: w_q is not written while a forward runs (a
    model's weights), so the GPU kernel may load it before the kernels before it finish."""
    if uses_kernels(x_q, w_q) and (out_scale is not None or out_dtype in _FLOATS):
        check_int8(x_q, "x_q")
        check_int8(w_q, "w_q")
        if x_q.shape[-1] <= _int8_linear.MAX_K:
            dev = x_q.device
            out = _k().linear.int8_linear(
                x_q, _scale(x_scale, "x_scale", dev), w_q, _scale(w_scale, "w_scale", dev), bias, out_dtype,
                None if out_scale is None else _scale(out_scale, "out_scale", dev), preload=constant_weights)
            if out is not None:
                return out
    return _int8_linear.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype, out_scale)


def _int8_conv_kernel(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
               bias: torch.Tensor | None, out_scale: ScaleLike | None,
               state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not uses_kernels(x_q, w_q, state):
        return None
    check_int8(x_q, "x_q")
    check_int8(w_q, "w_q")
    dev = x_q.device
    k = _k().conv
    return k.conv1d(x_q, w_q, bias, state, k.OUT_PRE if out_scale is None else k.OUT_Q8,
                    _scale(x_scale, "x_scale", dev), _scale(w_scale, "w_scale", dev),
                    None if out_scale is None else _scale(out_scale, "out_scale", dev), _inplace(state))


def int8_causal_conv1d(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                       bias: torch.Tensor | None = None,
                       state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.int8_conv.int8_causal_conv1d."""
    out = _int8_conv_kernel(x_q, x_scale, w_q, w_scale, bias, None, state)
    return out if out is not None else _int8_conv.int8_causal_conv1d(x_q, x_scale, w_q, w_scale, bias, state)


def int8_causal_conv1d_silu(x_q: torch.Tensor, x_scale: ScaleLike, w_q: torch.Tensor, w_scale: ScaleLike,
                            bias: torch.Tensor | None, out_scale: ScaleLike,
                            state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.int8_conv.int8_causal_conv1d_silu."""
    out = _int8_conv_kernel(x_q, x_scale, w_q, w_scale, bias, out_scale, state)
    if out is not None:
        return out
    return _int8_conv.int8_causal_conv1d_silu(x_q, x_scale, w_q, w_scale, bias, out_scale, state)


def _float_conv_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                fused_silu: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not (uses_kernels(x, weight, state) and x.dtype in _FLOATS and weight.dtype in _FLOATS):
        return None
    k = _k().conv
    return k.conv1d(x, weight, bias, state, k.OUT_SILU if fused_silu else k.OUT_PRE, inplace=_inplace(state))


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.conv.causal_conv1d."""
    out = _float_conv_kernel(x, weight, bias, state, False)
    return out if out is not None else _conv.causal_conv1d(x, weight, bias, state)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused conv + SiLU: (silu(causal_conv1d(x, ...)[0]) in x's dtype, new state)."""
    out = _float_conv_kernel(x, weight, bias, state, True)
    if out is not None:
        return out
    pre, new_state = _conv.causal_conv1d(x, weight, bias, state)
    return F.silu(pre).to(x.dtype), new_state


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ssmq.ops.norm.rms_norm."""
    if uses_kernels(x, weight) and x.dtype in _FLOATS and weight.dtype in _FLOATS:
        return _k().norm.rms_norm(x, weight, eps)
    return _norm.rms_norm(x, weight, eps)


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """ssmq.ops.norm.gated_rms_norm."""
    if uses_kernels(y, gate, weight) and all(t.dtype in _FLOATS for t in (y, gate, weight)):
        out = _k().norm.gated_rms_norm(y, gate, weight, eps, group_size)
        if out is not None:
            return out
    return _norm.gated_rms_norm(y, gate, weight, eps, group_size)


def dequant_gated_rms_norm(y: torch.Tensor, gate_codes: torch.Tensor, gate_scale: ScaleLike, weight: torch.Tensor,
                           eps: float, group_size: int) -> torch.Tensor:
    """gated_rms_norm(y, dequantize(gate_codes, gate_scale), weight, eps, group_size): the gated norm on an
    int8 gate (Mamba2's quantized z), dequantized inside the kernel on CUDA."""
    if uses_kernels(y, gate_codes, weight) and y.dtype in _FLOATS and weight.dtype in _FLOATS:
        check_int8(gate_codes, "gate codes")
        out = _k().norm.gated_rms_norm(y, gate_codes, weight, eps, group_size,
                                       _scale(gate_scale, "gate scale", y.device))
        if out is not None:
            return out
    return _norm.gated_rms_norm(y, _quantize.dequantize(gate_codes, gate_scale, "gate scale"), weight, eps,
                                group_size)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 residual_in_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: (rms_norm(stored, weight, eps), stored) with stored = residual + hidden
    (hidden alone without a residual) in fp32, or rounded to hidden's dtype."""
    if (uses_kernels(hidden, residual, weight) and hidden.dtype in _FLOATS and weight.dtype in _FLOATS
            and (residual is None or residual.dtype in _FLOATS)):
        return _k().norm.add_rms_norm(hidden, residual, weight, eps, residual_in_fp32)
    total = hidden.float() if residual is None else residual.float() + hidden.float()
    stored = total if residual_in_fp32 else total.to(hidden.dtype)
    return _norm.rms_norm(stored, weight, eps), stored


def int8_add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      out_scale: ScaleLike, residual_in_fp32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.int8_norm.int8_add_rms_norm."""
    if (uses_kernels(hidden, residual, weight) and hidden.dtype in _FLOATS and weight.dtype in _FLOATS
            and (residual is None or residual.dtype in _FLOATS)):
        out = _k().norm.int8_add_rms_norm(hidden, residual, weight, eps,
                                          _scale(out_scale, "out_scale", hidden.device), residual_in_fp32)
        if out is not None:
            return out
    return _int8_norm.int8_add_rms_norm(hidden, residual, weight, eps, out_scale, residual_in_fp32)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """ssmq.ops.hadamard.hadamard_transform."""
    if uses_kernels(x) and x.dtype in _FLOATS:
        out = _k().hadamard.hadamard(x)
        if out is not None:
            return out
    return _hadamard.hadamard_transform(x)


def hadamard_quantize(y: torch.Tensor, out_scale: ScaleLike, rotate: bool = True) -> torch.Tensor:
    """Fused rotation + quantization before out_proj: quantize(hadamard_transform(fp32(y)), out_scale), or
    quantize(fp32(y), out_scale) without the rotation."""
    if not rotate:
        return quantize(y, out_scale, "out_scale")
    if uses_kernels(y) and y.dtype in _FLOATS:
        out = _k().hadamard.hadamard(y, _scale(out_scale, "out_scale", y.device))
        if out is not None:
            return out
    return _quantize.quantize(_hadamard.hadamard_transform(y.float()), out_scale, "out_scale")


def gated_norm_hadamard_quantize(y: torch.Tensor, gate: torch.Tensor, gate_scale: ScaleLike | None,
                                 weight: torch.Tensor, eps: float, group_size: int,
                                 out_scale: ScaleLike) -> torch.Tensor:
    """hadamard_quantize(norm, out_scale) of norm = the gated RMSNorm of y with `gate` (int8 codes of
    gate_scale when that is given: dequant_gated_rms_norm, else gated_rms_norm): Mamba2's path from the
    scan output into out_proj, one kernel on CUDA where the shapes allow, the two ops otherwise."""
    if uses_kernels(y, gate, weight) and y.dtype in _FLOATS and weight.dtype in _FLOATS:
        dev = y.device
        if gate_scale is not None:
            check_int8(gate, "gate codes")
        out = _k().hadamard.gated_norm_hadamard(
            y, gate, weight, eps, group_size, None if gate_scale is None else _scale(gate_scale, "gate scale", dev),
            _scale(out_scale, "out_scale", dev))
        if out is not None:
            return out
    if gate_scale is None:
        normed = gated_rms_norm(y, gate, weight, eps, group_size)
    else:
        normed = dequant_gated_rms_norm(y, gate, gate_scale, weight, eps, group_size)
    return hadamard_quantize(normed, out_scale, True)


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.scan.selective_scan."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, state)
    if uses_kernels(*tensors) and all(t is None or t.dtype in _FLOATS for t in tensors):
        return _k().scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state, torch.float32,
                                        inplace=_inplace(state))
    return _scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state)


def int8_selective_scan(u_q: torch.Tensor, u_scale: ScaleLike, delta_q: torch.Tensor, delta_scale: ScaleLike,
                        A: torch.Tensor, B_q: torch.Tensor, B_scale: ScaleLike, C_q: torch.Tensor,
                        C_scale: ScaleLike, state_scale: ScaleLike, *, D: torch.Tensor | None = None,
                        z_q: torch.Tensor | None = None, z_scale: ScaleLike | None = None,
                        delta_bias: torch.Tensor | None = None, delta_softplus: bool = True,
                        state_q: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.int8_scan.int8_selective_scan."""
    codes = {"u": (u_q, u_scale), "delta": (delta_q, delta_scale), "B": (B_q, B_scale), "C": (C_q, C_scale),
             "state": (state_q, state_scale)}
    if z_q is not None:
        codes["z"] = (z_q, z_scale)
    if uses_kernels(u_q, delta_q, A, B_q, C_q, D, z_q, delta_bias, state_q) and out_dtype in _FLOATS:
        dev = u_q.device
        scales = {name: _scale(s, f"{name}_scale", dev) for name, (_, s) in codes.items()}
        for name, (q, _) in codes.items():
            if q is not None:
                check_int8(q, f"{name} codes")
        if all(s.numel() == 1 for s in scales.values()):
            return _k().scan.selective_scan(u_q, delta_q, A, B_q, C_q, D, z_q, delta_bias, delta_softplus, state_q,
                                            out_dtype, scales=scales, inplace=_inplace(state_q))
    return _int8_scan.int8_selective_scan(u_q, u_scale, delta_q, delta_scale, A, B_q, B_scale, C_q, C_scale,
                                          state_scale, D=D, z_q=z_q, z_scale=z_scale, delta_bias=delta_bias,
                                          delta_softplus=delta_softplus, state_q=state_q, out_dtype=out_dtype)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
             D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
             dt_limit: tuple[float, float] = (0.0, math.inf), state: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.scan.ssd_scan with y cast to out_dtype (the kernel stores it directly; its chunk length is
    its own: that changes only the summation order)."""
    tensors = (x, dt, A, B, C, D, dt_bias, state)
    if uses_kernels(*tensors) and all(t is None or t.dtype in _FLOATS for t in tensors) and out_dtype in _FLOATS:
        out = _k().ssd.ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, state, out_dtype,
                                inplace=_inplace(state))
        if out is not None:
            return out
    y, last = _scan.ssd_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, state)
    return y.to(out_dtype), last


def int8_ssd_scan(x_q: torch.Tensor, x_scale: ScaleLike, dt: torch.Tensor, A: torch.Tensor, B_q: torch.Tensor,
                  B_scale: ScaleLike, C_q: torch.Tensor, C_scale: ScaleLike, state_scale: ScaleLike,
                  chunk_size: int, *, dt_scale: ScaleLike | None = None, D: torch.Tensor | None = None,
                  dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
                  dt_limit: tuple[float, float] = (0.0, math.inf), state_q: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmq.ops.int8_scan.int8_ssd_scan."""
    codes = {"x": (x_q, x_scale), "B": (B_q, B_scale), "C": (C_q, C_scale), "state": (state_q, state_scale)}
    if dt_scale is not None:
        codes["dt"] = (dt, dt_scale)
    if (uses_kernels(x_q, dt, A, B_q, C_q, D, dt_bias, state_q) and out_dtype in _FLOATS
            and (dt_scale is not None or dt.dtype in _FLOATS)):
        dev = x_q.device
        scales = {name: _scale(s, f"{name}_scale", dev) for name, (_, s) in codes.items()}
        for name, (q, _) in codes.items():
            if q is not None:
                check_int8(q, f"{name} codes")
        out = _k().ssd.ssd_scan(x_q, dt, A, B_q, C_q, D, dt_bias, dt_softplus, dt_limit, state_q, out_dtype,
                                scales=scales, inplace=_inplace(state_q))
        if out is not None:
            return out
    return _int8_scan.int8_ssd_scan(x_q, x_scale, dt, A, B_q, B_scale, C_q, C_scale, state_scale, chunk_size,
                                    dt_scale=dt_scale, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                    dt_limit=dt_limit, state_q=state_q, out_dtype=out_dtype)


def w4a16_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ssmq.ops.int4_linear.w4a16_linear."""
    if uses_kernels(x, w_packed) and x.dtype in _FLOATS:
        out = _k().w4.w4a16_linear(x, w_packed, _scale(w_scale, "w_scale", x.device), bias, out_dtype)
        if out is not None:
            return out
    return _int4_linear.w4a16_linear(x, w_packed, w_scale, bias, out_dtype)


def w4a8_linear(x_q: torch.Tensor, x_scale: ScaleLike, w_packed: torch.Tensor, w_scale: ScaleLike,
                group_scale: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                out_scale: ScaleLike | None = None, constant_weights: bool = False) -> torch.Tensor:
    """ssmq.ops.int4_linear.w4a8_linear (the integer group scales are checked once per version, as scales);
    `constant_weights` as in int8_linear (for the packed weights and group scales)."""
    if (uses_kernels(x_q, w_packed, group_scale) and (out_scale is not None or out_dtype in _FLOATS)
            and x_q.shape[-1] <= _int4_linear.MAX_K_W4A8):
        check_int8(x_q, "x_q")
        _check_once(group_scale, "group_scale", _int4.check_group_scale)
        dev = x_q.device
        out = _k().w4.w4a8_linear(x_q, _scale(x_scale, "x_scale", dev), w_packed, _scale(w_scale, "w_scale", dev),
                                  group_scale, bias, out_dtype,
                                  None if out_scale is None else _scale(out_scale, "out_scale", dev),
                                  preload=constant_weights)
        if out is not None:
            return out
    return _int4_linear.w4a8_linear(x_q, x_scale, w_packed, w_scale, group_scale, bias, out_dtype, out_scale)


def w4a8_linear_conv_step(x_q: torch.Tensor, x_scale: ScaleLike, w_packed: torch.Tensor, w_scale: ScaleLike,
                          group_scale: torch.Tensor, bias: torch.Tensor | None, out_scale: ScaleLike, start: int,
                          conv_w: torch.Tensor, conv_w_scale: ScaleLike, conv_bias: torch.Tensor | None,
                          conv_out_scale: ScaleLike, state: torch.Tensor, constant_weights: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-token W4A8 projection feeding a causal conv step (Mamba2's in_proj into conv1d), defined as
    codes = w4a8_linear(x_q, ..., out_scale=out_scale) followed by
    int8_causal_conv1d_silu(codes[..., start:start + C], out_scale there, conv_w (C, k), conv_w_scale,
    conv_bias, conv_out_scale, state); returns (codes, conv codes, new state). One GPU kernel runs both
    (the projection's programs over those channels run the conv in their epilogue), updating a static
    state in place. `constant_weights` as in w4a8_linear."""
    channels = conv_w.shape[0]
    if (uses_kernels(x_q, w_packed, group_scale, conv_w, state) and x_q.shape[-1] <= _int4_linear.MAX_K_W4A8
            and state.dtype == torch.int8):
        check_int8(x_q, "x_q")
        check_int8(conv_w, "conv weight")
        _check_once(group_scale, "group_scale", _int4.check_group_scale)
        dev = x_q.device
        out = _k().w4.w4a8_linear_conv_step(
            x_q, _scale(x_scale, "x_scale", dev), w_packed, _scale(w_scale, "w_scale", dev), group_scale, bias,
            _scale(out_scale, "out_scale", dev), start, conv_w, _scale(conv_w_scale, "conv w_scale", dev),
            conv_bias, _scale(conv_out_scale, "conv out_scale", dev), state, inplace=_inplace(state),
            preload=constant_weights)
        if out is not None:
            return out
    codes = w4a8_linear(x_q, x_scale, w_packed, w_scale, group_scale, bias, out_scale=out_scale,
                        constant_weights=constant_weights)
    scale = torch.as_tensor(out_scale)
    if scale.dim() and scale.shape[-1] == codes.shape[-1] > 1:
        scale = scale[..., start:start + channels]
    conv, new_state = int8_causal_conv1d_silu(codes[..., start:start + channels], scale, conv_w, conv_w_scale,
                                              conv_bias, conv_out_scale, state)
    return codes, conv, new_state
