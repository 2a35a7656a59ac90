"""Quantized Mamba2 pieces: grouped scale layouts, per-segment quantizers, the int8 SSD scan and the gated
norm on int8 z. The weight modules (W8A8Linear, QuantCausalConv1d, QuantRMSNorm, QuantHadamard) are those
of ssmq.quant.modules; they take a `SegmentQuant` where one output carries several scales.

Scales are stored compactly in the ScaleBook under their tap names (`layers.{i}.conv.x` as [SSD group,
head group, channel group], `conv.B` / `conv.C` one per SSD group, `ssm.state` [SSD group, state index];
or one value per tensor) and expanded only where an op needs them:
- per channel (`channel_scale`), for the in_proj output and the conv input and output, whose x|B|C
  (and z, dt) segments each have their own scales;
- in the SSD layout (`ssd_scale`): x (heads, headdim), B and C (groups, 1), the state (heads, 1, d_state),
  which broadcast against the scan's codes and are constant where the kernels need them to be.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig
from ssmq.ops import dispatch as ops
from ssmq.ops.qtensor import QTensor
from ssmq.quant.modules import ActQuant, Deferred
from ssmq.quant.observers import BC_TAPS, STATE_TAP, X_TAPS, local_name
from ssmq.quant.scalebook import ScaleBook


def tap_channels(tap: str, cfg: MambaConfig) -> int:
    """The channel count of a flat Mamba2 activation tap (its last dimension)."""
    name = local_name(tap)
    if name in ("in_proj.z", *X_TAPS):
        return cfg.d_inner
    if name in BC_TAPS:
        return cfg.ngroups * cfg.d_state
    if name == "in_proj.dt":
        return cfg.nheads
    raise SsmqError(f"{tap}: not a per-channel Mamba2 activation tap")


def channel_scale(tap: str, value: torch.Tensor, cfg: MambaConfig) -> torch.Tensor:
    """A stored scale of a flat tap as a (channels,) vector, or 0-d for one value per tensor. Takes the
    grouped x layout [SSD group, head group, channel group] and any 1-D scale of contiguous channel groups
    (per SSD group for B / C, per channel, minmax(groups=N))."""
    if value.numel() == 1:
        return value.reshape(())
    channels = tap_channels(tap, cfg)
    if local_name(tap) in X_TAPS and value.dim() == 3:
        g, hg, cg = value.shape
        per_group = cfg.nheads // cfg.ngroups
        if g != cfg.ngroups or per_group % hg or cfg.headdim % cg:
            raise SsmqError(f"scale {tap} has shape {tuple(value.shape)}, which does not group {cfg.ngroups} SSD "
                            f"groups of {per_group} heads of {cfg.headdim} channels")
        grid = value.reshape(g, hg, 1, cg, 1).expand(g, hg, per_group // hg, cg, cfg.headdim // cg)
        return grid.reshape(channels)
    if value.dim() == 1 and channels % value.numel() == 0:
        return value.repeat_interleave(channels // value.numel())
    raise SsmqError(f"scale {tap} has shape {tuple(value.shape)}, which does not fit its {channels} channels")


def ssd_scale(tap: str, value: torch.Tensor, cfg: MambaConfig) -> torch.Tensor:
    """A stored scale in the layout the SSD scan broadcasts against its codes: x (heads, headdim),
    B / C (groups, 1) or (groups, d_state), ssm.state (heads, 1, d_state) or (heads, headdim, d_state);
    0-d for one value per tensor."""
    if value.numel() == 1:
        return value.reshape(())
    name = local_name(tap)
    heads, groups, n = cfg.nheads, cfg.ngroups, cfg.d_state
    if name in X_TAPS:
        return channel_scale(tap, value, cfg).reshape(heads, cfg.headdim)
    if name in BC_TAPS:
        if value.dim() == 1 and groups % value.numel() == 0:
            return value.repeat_interleave(groups // value.numel()).reshape(groups, 1)
        return channel_scale(tap, value, cfg).reshape(groups, n)
    if name == STATE_TAP:
        if value.shape == (groups, n):
            return value.repeat_interleave(heads // groups, dim=0).reshape(heads, 1, n)
        if value.shape == (heads, n):
            return value.reshape(heads, 1, n)
        if value.shape == (heads, cfg.headdim, n):
            return value
    raise SsmqError(f"scale {tap} has shape {tuple(value.shape)}, which the Mamba2 SSD scan cannot broadcast")


class _Expanded:
    """A value derived from ScaleBook entries or parameters, recomputed only when a source changes (edit,
    override, device or dtype move, new storage): one small computation per change instead of one per call."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: torch.Tensor | None = None

    def get(self, sources: list[torch.Tensor], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = tuple((id(t), t._version, t.device, t.dtype, t.data_ptr()) for t in sources)
        if key != self._key:
            self._value, self._key = make(), key
        return self._value


class SegmentQuant(ActQuant):
    """Static quantization of an output made of segments (Mamba2's in_proj z|x|B|C|dt, the conv's x|B|C),
    each to its own named scale: `scale_for` gives the per-channel concatenation of the segments' scales."""

    def __init__(self, book: ScaleBook, names: list[str], cfg: MambaConfig):
        super().__init__(book, ",".join(names))
        self.names, self.cfg = list(names), cfg
        self._cache = _Expanded()

    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        values = [self.book[n] for n in self.names]
        return self._cache.get(values, lambda: torch.cat(
            [channel_scale(n, v, self.cfg).expand(tap_channels(n, self.cfg)) for n, v in zip(self.names, values)]))


class QuantSSDScan(nn.Module):
    """Mamba2's SSD scan on int8 x, B, C (the conv output codes) and int8 dt (the in_proj codes), fp32
    recurrence, fp16 output; the final state is quantized to the `ssm.state` scale and kept as int8 codes
    in the decode cache. The x, B, C and state scales are read from the book in the SSD layout
    (`ssd_scale`): the same logical scales the conv quantized with, without their per-channel expansion."""

    def __init__(self, chunk_size: int, dt_limit: tuple[float, float], book: ScaleBook, x: str, B: str, C: str,
                 state: str, cfg: MambaConfig):
        super().__init__()
        self.chunk_size, self.dt_limit = chunk_size, tuple(dt_limit)
        self.book, self.names, self.cfg = book, {"x": x, "B": B, "C": C, "state": state}, cfg
        self._cache = {k: _Expanded() for k in self.names}

    def scale(self, key: str) -> torch.Tensor:
        """The scale of operand `key` ('x', 'B', 'C', 'state') in the SSD layout."""
        name = self.names[key]
        value = self.book[name]
        return self._cache[key].get([value], lambda: ssd_scale(name, value, self.cfg))

    def forward(self, x: QTensor, dt: QTensor, A: torch.Tensor, B: QTensor, C: QTensor, D: torch.Tensor,
                dt_bias: torch.Tensor, state: QTensor | None) -> tuple[torch.Tensor, QTensor]:
        state_scale = self.scale("state")
        y, codes = ops.int8_ssd_scan(
            x.codes, self.scale("x"), dt.codes, A, B.codes, self.scale("B"), C.codes, self.scale("C"), state_scale,
            self.chunk_size, dt_scale=dt.scale, D=D.float(), dt_bias=dt_bias.float(), dt_limit=self.dt_limit,
            state_q=None if state is None else state.codes)
        return y, QTensor(codes, state_scale)


class GatedNormOutput(Deferred):
    """QuantGatedRMSNorm's result, computed by its consumer: QuantHadamard runs norm, rotation and the
    `out_proj.in` quantization as one op (dispatch.gated_norm_hadamard_quantize)."""

    def __init__(self, y: torch.Tensor, z: QTensor | torch.Tensor, weight: torch.Tensor, eps: float,
                 group_size: int):
        self.y, self.weight, self.eps, self.group_size = y, weight, eps, group_size
        self.gate, self.gate_scale = (z.codes, z.scale) if isinstance(z, QTensor) else (z, None)

    def value(self) -> torch.Tensor:
        if self.gate_scale is not None:
            return ops.dequant_gated_rms_norm(self.y, self.gate, self.gate_scale, self.weight, self.eps,
                                              self.group_size)
        return ops.gated_rms_norm(self.y, self.gate, self.weight, self.eps, self.group_size)

    def rotate_quantize(self, scale: torch.Tensor) -> torch.Tensor:
        return ops.gated_norm_hadamard_quantize(self.y, self.gate, self.gate_scale, self.weight, self.eps,
                                                self.group_size, scale)


class QuantGatedRMSNorm(nn.Module):
    """Mamba2's gated group-wise RMSNorm on the scan output y and int8 z (dequantized), in fp32. It returns
    the norm deferred (GatedNormOutput), for its consumer, the Hadamard rotation and `out_proj.in`
    quantization (QuantHadamard), to compute in one kernel with its own op."""

    def __init__(self, dim: int, eps: float, group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size = eps, group_size
        self._weight32 = _Expanded()

    def forward(self, y: torch.Tensor, z: QTensor | torch.Tensor) -> GatedNormOutput:
        weight = self._weight32.get([self.weight], lambda: self.weight.detach().float())  # no cast per call
        return GatedNormOutput(y, z, weight, self.eps, self.group_size)
