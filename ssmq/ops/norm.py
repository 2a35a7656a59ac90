"""RMSNorm and the grouped, gated RMSNorm of Mamba2 (reference versions, computed in fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; fp32 math, output in weight's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(weight.dtype)


def gated_rms_norm(y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int) -> torch.Tensor:
    """Mamba2's norm: RMSNorm of y * silu(gate), each group of `group_size` channels normalised alone."""
    h = y.float() * F.silu(gate.float())
    *lead, width = h.shape
    grouped = h.view(*lead, width // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view(*lead, width).to(weight.dtype)
