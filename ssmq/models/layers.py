"""Building blocks shared by the Mamba1 and Mamba2 mixers.

Each is a module whose parameter names match the checkpoint keys, so a precision plan can swap one
for a quantized module with the same call signature without touching the mixers' forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssmq.models.taps import Taps
from ssmq.ops import dispatch as ops


class RMSNorm(nn.Module):
    """Residual add + RMSNorm over the last dimension (fp32 math, output in the weight's dtype).

    Takes the previous block's output and the residual stream before it, and returns the normed sum
    and the new stream (fp32 when `residual_in_fp32`, else in hidden's dtype), so that the add runs
    inside the norm's kernel. `residual` None (first block, or a stream already summed) means the
    stream is `hidden` itself."""

    def __init__(self, dim: int, eps: float, residual_in_fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.residual_in_fp32 = eps, residual_in_fp32

    def forward(self, hidden: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.add_rms_norm(hidden, residual, self.weight, self.eps, self.residual_in_fp32)


class Decay:
    """The SSM decay A = -exp(A_log) in fp32, computed once per value of A_log rather than on every call
    (two kernels per layer and decoding step otherwise). The cached value is reused while A_log keeps
    its storage and its in-place version (a `copy_`, a `load_state_dict`, `.to()` or `p.data = ...` all
    change one of them); with autograd recording it is recomputed every call."""

    def __init__(self) -> None:
        self._src: torch.Tensor | None = None  # keeps the source storage alive, so its address is not reused
        self._version = -1
        self._value: torch.Tensor | None = None

    def __call__(self, a_log: torch.Tensor) -> torch.Tensor:
        if a_log.requires_grad and torch.is_grad_enabled():
            return -torch.exp(a_log.float())
        src = self._src
        if (self._value is None or src is None or src.data_ptr() != a_log.data_ptr() or src.shape != a_log.shape
                or src.dtype != a_log.dtype or src.device != a_log.device or self._version != a_log._version):
            self._value = -torch.exp(a_log.detach().float())
            self._src, self._version = a_log.detach(), a_log._version
        return self._value


class GatedRMSNorm(nn.Module):
    """Mamba2's group-wise RMSNorm of y * silu(z)."""

    def __init__(self, dim: int, eps: float, group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(y, z, self.weight, self.eps, self.group_size)


class CausalConv1d(nn.Module):
    """Depthwise causal conv1d followed by SiLU; `weight` has the checkpoint shape (channels, 1, kernel).

    Conv and activation are one module because kernels fuse them (and, quantized, the output
    quantization). The pre-activation is visible through the `conv.pre_act` tap: while a hook listens
    there, conv and SiLU run as two ops with the tap between them; otherwise as one fused op."""

    def __init__(self, channels: int, kernel: int, bias: bool, taps: Taps, prefix: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.taps, self.pre_act_tap = taps, prefix + "conv.pre_act"
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, length, channels). Returns silu(conv(x)) in x's dtype and the new conv state."""
        if not self.taps.has_hook(self.pre_act_tap):
            return ops.causal_conv1d_silu(x, self.weight[:, 0], self.bias, state)
        pre, new_state = ops.causal_conv1d(x, self.weight[:, 0], self.bias, state)
        pre = self.taps(self.pre_act_tap, pre)
        return nn.functional.silu(pre).to(x.dtype), new_state


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
    """Mamba1's selective scan as a swappable module (no parameters of its own); output in u's dtype."""

    def forward(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        y, last = ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, state)
        return y.to(u.dtype), last


class SSDScan(nn.Module):
    """Mamba2's chunked SSD scan as a swappable module (no parameters of its own); output in x's dtype."""

    def __init__(self, chunk_size: int, dt_limit: tuple[float, float]):
        super().__init__()
        self.chunk_size = chunk_size
        self.dt_limit = dt_limit

    def forward(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor,
                state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.ssd_scan(x, dt, A, B, C, self.chunk_size, D, dt_bias, True, self.dt_limit, state, x.dtype)
