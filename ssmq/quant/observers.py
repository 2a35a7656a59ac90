"""Observers: small accumulators, each with one job, that turn calibration samples into the value a
quantization scale is derived from (scale = value / 127, DESIGN §3).

A sample is one calibration document's part of a tap's tensor: (length, channels) for activations,
the document's final state for `ssm.state`. Observers look at |x| in float32.

Quantiles are defined as numpy's default (linear interpolation between order statistics) and are
exact on tensors of any size: `torch.quantile` sorts everything and refuses more than 2^24
elements, whereas here only the top of the sample, above a value known to lie below the needed
order statistics, is sorted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig

X_TAPS = ("in_proj.x", "conv.x")
BC_TAPS = ("in_proj.B", "in_proj.C", "conv.B", "conv.C")
STATE_TAP = "ssm.state"


def local_name(tap: str) -> str:
    """'layers.3.conv.out' -> 'conv.out'."""
    return re.sub(r"^layers\.\d+\.", "", tap)


def channel_reduce_dims(arch: str, tap: str) -> tuple[int, ...]:
    """Dimensions of one sample that are reduced to get its per-channel maxima: the length of an
    activation (length, channels); none of a Mamba1 state (d_inner, d_state); headdim of a Mamba2
    state (nheads, headdim, d_state), whose channels are then (nheads, d_state)."""
    if local_name(tap) != STATE_TAP:
        return (0,)
    return () if arch == "mamba1" else (1,)


def check_alpha_sigma(alpha: float, sigma: float) -> None:
    if not 0 < alpha <= 1:
        raise SsmqError(f"percentile alpha must be in (0, 1], got {alpha}")
    if not 0 < sigma <= 1:
        raise SsmqError(f"percentile sigma must be in (0, 1], got {sigma}")


def lowest_rank(n: int, alphas: Sequence[float]) -> int:
    """The smallest 0-based order statistic the quantiles at `alphas` of n values need."""
    return min(int(math.floor((n - 1) * alpha)) for alpha in alphas)


def quantiles(values: torch.Tensor, alphas: Sequence[float], floor: torch.Tensor | float | None = None
              ) -> torch.Tensor:
    """Quantiles (float32, one per alpha) of a 1-D float32 tensor, exactly as numpy's default method
    computes them in float64: h = (n-1)·α, then linear interpolation between the order statistics
    floor(h) and floor(h)+1.

    `floor`, if given, must not exceed the smallest order statistic needed (e.g. `rank_floor` of the
    sample's histogram); otherwise it is found with `kthvalue`. Only values >= floor are sorted."""
    n = values.numel()
    if n == 0:
        raise ValueError("quantiles of an empty tensor")
    positions = [(n - 1) * alpha for alpha in alphas]
    lo = [min(int(math.floor(h)), n - 1) for h in positions]
    hi = [min(i + 1, n - 1) for i in lo]
    if floor is None:
        floor = torch.kthvalue(values, lowest_rank(n, alphas) + 1).values
    top = torch.sort(values[values >= floor]).values
    start = n - top.numel()  # ascending rank of top[0]
    if start > min(lo):
        raise ValueError(f"floor {float(floor)} is above the order statistic of rank {min(lo)}")
    index = torch.tensor([i - start for i in lo + hi], device=values.device)
    a, b = top[index].double().split(len(alphas))
    gamma = torch.tensor([h - i for h, i in zip(positions, lo)], dtype=torch.float64, device=values.device)
    diff = b - a
    return torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma).float()


def ema_update(m: float | None, p: float, sigma: float) -> float:
    """The Quamba aggregation of per-sample percentiles, in float64: m <- p, then m <- m + σ·(p - m)."""
    return p if m is None else m + sigma * (p - m)


@dataclass(frozen=True)
class Grouping:
    """How per-channel maxima are reduced to the shape of a scale: reshape to `view`, max over `reduce`."""

    view: tuple[int, ...]
    reduce: tuple[int, ...]

    def apply(self, channel_max: torch.Tensor) -> torch.Tensor:
        return channel_max.reshape(self.view).amax(dim=self.reduce)


def contiguous_groups(channels: int, groups: int, tap: str = "") -> Grouping:
    """`groups` scales over contiguous runs of channels."""
    if groups < 1 or channels % groups:
        raise SsmqError(f"{tap or 'tap'}: {channels} channels cannot be split into {groups} equal groups")
    return Grouping((groups, channels // groups), (1,))


def mamba2_grouping(tap: str, cfg: MambaConfig, head_groups: int = 4, channel_groups: int = 4) -> Grouping:
    """Quamba2's scale shapes for a Mamba2 tap (contiguous groups; DESIGN §3):
    x: [SSD group, head group, channel group]; B and C: one per SSD group; ssm.state: [SSD group, state index]."""
    name = local_name(tap)
    if cfg.arch != "mamba2":
        raise SsmqError(f"{tap}: grouped_minmax is for Mamba2 models")
    g, hpg = cfg.ngroups, cfg.nheads // cfg.ngroups
    if name in X_TAPS:
        if head_groups < 1 or hpg % head_groups:
            raise SsmqError(f"{tap}: {hpg} heads per SSD group cannot be split into {head_groups} head groups")
        if channel_groups < 1 or cfg.headdim % channel_groups:
            raise SsmqError(f"{tap}: headdim {cfg.headdim} cannot be split into {channel_groups} channel groups")
        return Grouping((g, head_groups, hpg // head_groups, channel_groups, cfg.headdim // channel_groups), (2, 4))
    if name in BC_TAPS:
        return Grouping((g, cfg.d_state), (1,))
    if name == STATE_TAP:
        return Grouping((g, hpg, cfg.d_state), (1,))
    raise SsmqError(f"{tap}: grouped_minmax applies to the Mamba2 taps {', '.join(X_TAPS + BC_TAPS)} "
                    f"and {STATE_TAP}")


class MinMaxObserver:
    """Running max of |x| over samples: per tensor (`sample_dims` None), or per channel after reducing
    `sample_dims` of each sample, optionally reduced further to channel groups by `grouping`."""

    def __init__(self, sample_dims: tuple[int, ...] | None = None, grouping: Grouping | None = None):
        self.sample_dims, self.grouping = sample_dims, grouping
        self.max: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Fold in one sample; returns that sample's own maxima."""
        a = x.detach().float().abs()
        if self.sample_dims is None:
            m = a.amax()
        else:
            m = a.amax(dim=self.sample_dims) if self.sample_dims else a
        self.max = m if self.max is None else torch.maximum(self.max, m)
        return m

    def result(self) -> torch.Tensor:
        if self.max is None:
            raise SsmqError("minmax observer has seen no sample")
        return self.grouping.apply(self.max) if self.grouping is not None else self.max


def grouped_minmax(tap: str, cfg: MambaConfig, head_groups: int = 4, channel_groups: int = 4) -> MinMaxObserver:
    """The grouped minmax observer of a Mamba2 tap (see `mamba2_grouping`)."""
    return MinMaxObserver(channel_reduce_dims(cfg.arch, tap), mamba2_grouping(tap, cfg, head_groups, channel_groups))


class PercentileObserver:
    """Per sample p = quantile(|x|, α); aggregated as m <- p for the first sample, then m <- m + σ·(p - m)."""

    def __init__(self, alpha: float = 0.9995, sigma: float = 0.01):
        check_alpha_sigma(alpha, sigma)
        self.alpha, self.sigma = alpha, sigma
        self.m: float | None = None

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Fold in one sample; returns its percentile."""
        p = quantiles(x.detach().float().abs().reshape(-1), [self.alpha])[0]
        self.m = ema_update(self.m, float(p), self.sigma)
        return p

    def result(self) -> torch.Tensor:
        if self.m is None:
            raise SsmqError("percentile observer has seen no sample")
        return torch.tensor(self.m, dtype=torch.float32)
