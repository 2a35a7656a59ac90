"""The Mamba2 mixer: in_proj split into z, x, B, C, dt -> conv1d + SiLU on x|B|C -> chunked SSD scan
-> gated group-wise RMSNorm -> out_proj. Written once; precision is what the taps and submodules carry
(a quantized in_proj may run the conv's decoding step in its own kernel: Mamba2Mixer._project).
"""

from __future__ import annotations

import torch
from torch import nn

from ssmq.models.cache import MambaCache
from ssmq.models.config import MambaConfig
from ssmq.models.layers import CausalConv1d, Decay, GatedRMSNorm, SSDScan
from ssmq.models.taps import Taps
from ssmq.ops.qtensor import QTensor, cat_channels


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig, layer: int, taps: Taps):
        super().__init__()
        self.layer, self.taps, self.prefix = layer, taps, f"layers.{layer}."
        self.d_inner, self.d_state, self.ngroups = cfg.d_inner, cfg.d_state, cfg.ngroups
        self.nheads, self.headdim = cfg.nheads, cfg.headdim
        bc = cfg.ngroups * cfg.d_state
        self.splits = [cfg.d_inner, cfg.d_inner, bc, bc, cfg.nheads]
        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.proj_bias)
        self.conv1d = CausalConv1d(cfg.conv_dim, cfg.d_conv, cfg.conv_bias, taps, self.prefix)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.nheads))
        self.A_log = nn.Parameter(torch.zeros(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.decay = Decay()
        self.scan = SSDScan(cfg.chunk_size, cfg.dt_limit)
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.norm_eps, cfg.d_inner // cfg.ngroups)
        self.out_rotation: nn.Module = nn.Identity()
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.proj_bias)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden: (batch, length, d_model), the tapped norm output. Updates `cache` in place."""
        tap, p = self.taps, self.prefix
        batch, length, _ = hidden.shape
        conv_state = cache.conv[self.layer] if cache else None
        projected, convolved = self._project(hidden, conv_state)
        z, x, B, C, dt = projected.split(self.splits, dim=-1)
        z, x = tap(p + "in_proj.z", z), tap(p + "in_proj.x", x)
        B, C, dt = tap(p + "in_proj.B", B), tap(p + "in_proj.C", C), tap(p + "in_proj.dt", dt)
        if convolved is None:
            convolved = self.conv1d(cat_channels([x, B, C]), conv_state)
        xBC, conv_state = convolved
        x, B, C = xBC.split(self.splits[1:4], dim=-1)
        x, B, C = tap(p + "conv.x", x), tap(p + "conv.B", B), tap(p + "conv.C", C)
        A = self.decay(self.A_log)
        y, state = self.scan(x.reshape(batch, length, self.nheads, self.headdim), dt, A,
                             B.reshape(batch, length, self.ngroups, self.d_state),
                             C.reshape(batch, length, self.ngroups, self.d_state),
                             self.D, self.dt_bias, cache.ssm[self.layer] if cache else None)
        state = tap(p + "ssm.state", state)
        if cache is not None:
            cache.conv[self.layer], cache.ssm[self.layer] = conv_state, state
        y = tap(p + "ssm.y", y.reshape(batch, length, self.d_inner))
        y = tap(p + "out_proj.in", self.out_rotation(self.norm(y, z)))
        return self.out_proj(y)

    def _project(self, hidden: torch.Tensor | QTensor, conv_state: torch.Tensor | None
                 ) -> tuple[torch.Tensor | QTensor, tuple[torch.Tensor | QTensor, torch.Tensor] | None]:
        """(in_proj output, None), or (in_proj output, (conv output, new conv state)) where in_proj runs the
        conv's one-token step in its own op (a quantized decoding step: project_and_convolve) and no hook
        could see or replace the x, B, C values between the two (their taps are still called, on the
        projection's output, which holds them)."""
        joint = getattr(self.in_proj, "project_and_convolve", None)
        if joint is not None and hidden.shape[1] == 1 and conv_state is not None and not any(
                self.taps.has_hook(self.prefix + name) for name in ("in_proj.x", "in_proj.B", "in_proj.C")):
            out = joint(hidden, self.conv1d, conv_state, self.splits[0])
            if out is not None:
                return out
        return self.in_proj(hidden), None
