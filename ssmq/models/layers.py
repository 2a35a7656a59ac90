"""Building blocks shared by the Mamba1 and Mamba2 mixers.

Each is a module whose parameter names match the checkpoint keys, so a precision plan can swap one
for a quantized module with the same call signature without touching the mixers' forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssmq.ops import conv, norm, scan


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (fp32 math, output in the weight's dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """Mamba2's group-wise RMSNorm of y * silu(z)."""

    def __init__(self, dim: int, eps: float, group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return norm.gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


class CausalConv1d(nn.Module):
    """Depthwise causal conv1d; `weight` has the checkpoint shape (channels, 1, kernel)."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, length, channels). Returns fp32 pre-activation output and the new conv state."""
        return conv.causal_conv1d(x, self.weight[:, 0], self.bias, state)


class DeltaProjection(nn.Module):
    """dt_proj of Mamba1: forward is the matmul alone; `bias` is added inside the scan, before softplus,
    so the `dt_proj.out` tap sees delta without bias (as Quamba quantizes it)."""

    def __init__(self, rank: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, rank))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class SelectiveScan(nn.Module):
    """Mamba1's selective scan as a swappable module (no parameters of its own)."""

    def forward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, state)


class SSDScan(nn.Module):
    """Mamba2's chunked SSD scan as a swappable module (no parameters of its own)."""

    def __init__(self, chunk_size: int, dt_limit: tuple[float, float]):
        super().__init__()
        self.chunk_size = chunk_size
        self.dt_limit = dt_limit

    def forward(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return scan.ssd_scan(x, dt, A, B, C, self.chunk_size, D, dt_bias, True, self.dt_limit, state)
