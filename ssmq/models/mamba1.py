"""The Mamba1 mixer: in_proj -> causal conv1d + SiLU -> x_proj -> dt_proj -> selective scan -> out_proj.

The data flow is written once, here. Every quantization point goes through a named tap, and every
operator is a swappable submodule, so precision is decided by what is plugged in, not by this code.
"""

from __future__ import annotations

import torch
from torch import nn

from ssmq.models.cache import MambaCache
from ssmq.models.config import MambaConfig
from ssmq.models.layers import CausalConv1d, Decay, DeltaProjection, SelectiveScan
from ssmq.models.taps import Taps


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig, layer: int, taps: Taps):
        super().__init__()
        self.layer, self.taps, self.prefix = layer, taps, f"layers.{layer}."
        self.d_inner, self.d_state, self.dt_rank = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(cfg.d_model, 2 * cfg.d_inner, bias=cfg.proj_bias)
        self.conv1d = CausalConv1d(cfg.d_inner, cfg.d_conv, cfg.conv_bias, taps, self.prefix)
        self.x_proj = nn.Linear(cfg.d_inner, cfg.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = DeltaProjection(cfg.dt_rank, cfg.d_inner)
        self.A_log = nn.Parameter(torch.empty(cfg.d_inner, cfg.d_state))
        self.D = nn.Parameter(torch.ones(cfg.d_inner))
        self.decay = Decay()
        self.scan = SelectiveScan()
        self.out_rotation: nn.Module = nn.Identity()
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.proj_bias)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden: (batch, length, d_model), the tapped norm output. Updates `cache` in place."""
        tap, p = self.taps, self.prefix
        xz = tap(p + "in_proj.out", self.in_proj(hidden))
        x, z = xz.split(self.d_inner, dim=-1)
        u, conv_state = self.conv1d(x, cache.conv[self.layer] if cache else None)
        u = tap(p + "conv.out", u)
        x_dbl = tap(p + "x_proj.out", self.x_proj(u))
        dt_low, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = tap(p + "dt_proj.out", self.dt_proj(dt_low))
        A = self.decay(self.A_log)
        y, state = self.scan(u, delta, A, B, C, self.D, z, self.dt_proj.bias,
                             cache.ssm[self.layer] if cache else None)
        state = tap(p + "ssm.state", state)
        if cache is not None:
            cache.conv[self.layer], cache.ssm[self.layer] = conv_state, state
        y = tap(p + "ssm.y", y)
        y = tap(p + "out_proj.in", self.out_rotation(y))
        return self.out_proj(y)
