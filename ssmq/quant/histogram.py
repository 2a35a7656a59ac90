"""A histogram of |x| with log-spaced bins read straight off the float32 bit pattern.

The bin of a non-negative float32 is its top 16 bits (sign, 8 exponent bits, the first
MANTISSA_BITS mantissa bits): 128 bins per power of two, each 2^-7 ≈ 0.78% wide relative to its
lower edge. Binning is integer arithmetic on the bits, so it is exact, identical on every device,
and histograms of different samples merge by adding counts; no range has to be known in advance.

Values below 2^-24 ≈ 6e-8 (zeros included) share one floor bin: they are far below the smallest
int8 step ssmq produces (scales are at least 1e-6). NaN and Inf land in the bins of exponent 255, which is how
non-finite activations are detected.

Estimates read from a histogram (a quantile, the fraction above a threshold) are exact up to one
bin: a quantile estimate is within 2^-7 ≈ 0.78% (relative) of the true value; a clipped fraction
is off by at most the count of the bin holding the threshold divided by the total.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MANTISSA_BITS = 7
_SHIFT = 23 - MANTISSA_BITS
NUM_BINS = 1 << (31 - _SHIFT)                      # every non-negative float32 bit pattern
FLOOR_BIN = (127 - 24) << MANTISSA_BITS            # lower edge 2^-24; smaller values are counted here
NONFINITE_BIN = 255 << MANTISSA_BITS               # first bin of Inf / NaN
RELATIVE_BIN_WIDTH = 2.0 ** -MANTISSA_BITS


def bin_counts(absx: torch.Tensor) -> torch.Tensor:
    """Counts (NUM_BINS,) int64 of the float32 tensor |x| (any shape), on its device."""
    bits = absx.contiguous().view(-1).view(torch.int32) & 0x7FFFFFFF
    return torch.bincount((bits >> _SHIFT).clamp_(min=FLOOR_BIN), minlength=NUM_BINS)


def nonfinite_count(counts: torch.Tensor) -> torch.Tensor:
    """How many of the counted values were NaN or Inf (a 0-d tensor, no device sync)."""
    return counts[NONFINITE_BIN:].sum()


def _edges(bins: torch.Tensor) -> torch.Tensor:
    """Lower edges (float32) of the given bin indices; the floor bin starts at 0."""
    edges = (bins.to(torch.int32) << _SHIFT).view(torch.float32)
    return torch.where(bins <= FLOOR_BIN, torch.zeros_like(edges), edges)


def rank_floor(counts: torch.Tensor, rank: int) -> torch.Tensor:
    """A value <= the element of ascending 0-based `rank`: the lower edge of the bin that holds it.

    Everything >= this value is the top of the sample, a small set for high ranks: this is how the
    exact quantile of a large tensor is found without sorting all of it."""
    cumulative = counts.cumsum(0)
    bin_index = torch.searchsorted(cumulative, torch.tensor([rank], device=counts.device), right=True)
    return _edges(bin_index)[0]


def _np_edges(bins: np.ndarray) -> np.ndarray:
    edges = (bins.astype(np.uint32) << _SHIFT).view(np.float32).astype(np.float64)
    return np.where(bins <= FLOOR_BIN, 0.0, edges)


class Histogram:
    """A stored histogram: the counts of bins offset .. offset+len(counts)-1 (all others are empty)."""

    def __init__(self, counts: torch.Tensor, offset: int):
        self.counts = counts.to(torch.int64).cpu()
        self.offset = int(offset)

    def compact_counts(self) -> torch.Tensor:
        """The counts as int32 when they fit (they nearly always do), for storage."""
        fits = self.counts.numel() == 0 or int(self.counts.max()) < 2**31
        return self.counts.to(torch.int32) if fits else self.counts

    @classmethod
    def from_dense(cls, counts: torch.Tensor) -> Histogram:
        """Trim a full NUM_BINS histogram to its occupied range."""
        nonzero = torch.nonzero(counts.cpu()).flatten()
        if nonzero.numel() == 0:
            return cls(torch.zeros(0, dtype=torch.int64), FLOOR_BIN)
        first, last = int(nonzero[0]), int(nonzero[-1])
        return cls(counts.cpu()[first:last + 1].clone(), first)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(counts, lower edges, upper edges) of the stored bins; edges in float64."""
        counts = self.counts.numpy()
        bins = np.arange(self.offset, self.offset + len(counts))
        return counts, _np_edges(bins), _np_edges(bins + 1)

    def value_at_rank(self, rank: int, absmax: float) -> float:
        """Estimate of the element of ascending 0-based `rank`, spreading each bin's elements evenly
        over the bin (the top bin ends at the true max)."""
        counts, lower, upper = self.bins()
        cumulative = np.cumsum(counts)
        b = int(np.searchsorted(cumulative, rank, side="right"))
        below = int(cumulative[b - 1]) if b > 0 else 0
        hi = min(upper[b], absmax)
        lo = min(lower[b], hi)
        return float(lo + (rank - below + 0.5) / counts[b] * (hi - lo))

    def estimate_quantile(self, alpha: float, absmax: float) -> float:
        """The α-quantile of all counted values, defined as numpy's default (linear interpolation
        between order statistics); each order statistic is estimated within its bin."""
        n = self.total
        h = (n - 1) * alpha
        lo = min(int(math.floor(h)), n - 1)
        a = self.value_at_rank(lo, absmax)
        b = self.value_at_rank(min(lo + 1, n - 1), absmax)
        return a + (b - a) * (h - lo)

    def fraction_above(self, threshold: float, absmax: float) -> float:
        """Estimated fraction of values with |x| > threshold (the bin holding the threshold is split
        in proportion to its width; the top bin ends at the true max)."""
        counts, lower, upper = self.bins()
        hi = np.minimum(upper, absmax)
        lo = np.minimum(lower, hi)
        width = hi - lo
        share = np.clip((hi - threshold) / np.where(width > 0, width, 1.0), 0.0, 1.0)
        above = np.where(width > 0, share, (lo > threshold).astype(np.float64))
        return float((counts * above).sum() / max(self.total, 1))
