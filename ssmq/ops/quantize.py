"""Symmetric int8 quantization: the one rounding rule, saturation, and scale validity.

value = scale * code, code = clamp(round(x / scale), -128, 127). `round` is round half to even
(torch.round, Triton's rint, the GPU's cvt.rni). `x / scale` is a correctly rounded fp32 division,
not x * (1 / scale): the two differ by one code on some inputs, and a kernel must reproduce this one.
Every other int8 op in ssmq.ops quantizes through `quantize`, so the rule is written only here.
"""

from __future__ import annotations

import torch

from ssmq.errors import SsmqError

QMIN, QMAX = -128, 127
MIN_SCALE = 1e-6  # floor of every scale derived from an abs-max: an all-zero tensor still gets a valid scale

ScaleLike = torch.Tensor | float


def check_scale(scale: ScaleLike | None, name: str) -> torch.Tensor:
    """`scale` as an fp32 tensor; SsmqError naming it if it is missing or any value is 0, negative,
    NaN or infinite."""
    if scale is None:
        raise SsmqError(f"scale {name} is missing")
    s = torch.as_tensor(scale, dtype=torch.float32)
    bad = ~torch.isfinite(s) | (s <= 0)
    if bool(bad.any()):
        first = s[bad].flatten()[0].item()
        raise SsmqError(f"scale {name} is invalid ({first} at {int(bad.sum())} of {s.numel()} entries): "
                        f"every scale must be a finite number > 0")
    return s


def check_int8(codes: torch.Tensor, name: str) -> None:
    """TypeError unless `codes` is an int8 tensor (a caller bug, not a user error)."""
    if codes.dtype != torch.int8:
        raise TypeError(f"{name} must be int8 codes, got {codes.dtype}")


def quantize(x: torch.Tensor, scale: ScaleLike, name: str = "scale") -> torch.Tensor:
    """int8 codes clamp(round_half_even(fp32(x) / scale), -128, 127).

    `scale` broadcasts against x (0-d per tensor, a vector over the last dim per channel, (..., 1) per
    token, any broadcastable shape per group). +-inf saturate to 127 / -128 and NaN becomes 0, as the
    GPU's saturating float-to-int conversion does.
    """
    s = check_scale(scale, name).to(x.device)
    v = torch.nan_to_num(x.float() / s, nan=0.0, posinf=float(QMAX), neginf=float(QMIN))
    return torch.round(v).clamp_(QMIN, QMAX).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: ScaleLike, name: str = "scale") -> torch.Tensor:
    """fp32 values scale * codes (one rounding: the fp32 product)."""
    check_int8(codes, f"codes of {name}")
    return codes.float() * check_scale(scale, name).to(codes.device)


def scale_from_amax(amax: ScaleLike, qmax: int = QMAX) -> torch.Tensor:
    """The abs-max scale max(amax / qmax, 1e-6) in fp32; SsmqError if amax is NaN or infinite."""
    s = torch.clamp(torch.as_tensor(amax, dtype=torch.float32) / qmax, min=MIN_SCALE)
    return check_scale(s, "derived from amax")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: one abs-max scale per row of the last dim.
    Returns (int8 codes like x, fp32 scales of shape (..., 1))."""
    scale = scale_from_amax(x.detach().float().abs().amax(dim=-1, keepdim=True))
    return quantize(x, scale, "per-token scale"), scale
