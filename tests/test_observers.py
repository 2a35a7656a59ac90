"""Observers, the exact quantile and the |x| histogram."""

import math

import numpy as np
import pytest
import torch

from ssmq.errors import SsmqError
from ssmq.quant.histogram import (FLOOR_BIN, NONFINITE_BIN, RELATIVE_BIN_WIDTH, Histogram, bin_counts,
                                  nonfinite_count, rank_floor)
from ssmq.quant.observers import (MinMaxObserver, PercentileObserver, contiguous_groups, grouped_minmax,
                                  lowest_rank, mamba2_grouping, quantiles)

from conftest import tiny_config

ALPHAS = [0.0001, 0.25, 0.5, 0.9, 0.99, 0.999, 0.9995, 0.9999, 0.99999, 1.0]


def numpy_quantiles(x: torch.Tensor, alphas) -> np.ndarray:
    return np.quantile(x.double().numpy(), alphas).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 65537])
def test_quantiles_equal_numpy(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    assert np.array_equal(quantiles(x, ALPHAS).numpy(), numpy_quantiles(x, ALPHAS))


def test_quantiles_with_ties_and_a_histogram_floor():
    x = torch.randint(0, 7, (5000,), generator=torch.Generator().manual_seed(0)).float() / 4
    expected = numpy_quantiles(x, ALPHAS)
    assert np.array_equal(quantiles(x, ALPHAS).numpy(), expected)
    floor = rank_floor(bin_counts(x), lowest_rank(x.numel(), ALPHAS))
    assert np.array_equal(quantiles(x, ALPHAS, floor).numpy(), expected)
    with pytest.raises(ValueError, match="above the order statistic"):
        quantiles(x, [0.5], floor=1.0)


def test_histogram_floor_is_below_the_order_statistic_and_gives_numpy_results():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)).abs() * 3
    ordered = x.sort().values
    for alphas in ([0.99], [0.9995, 1.0], [0.5]):
        rank = lowest_rank(x.numel(), alphas)
        floor = rank_floor(bin_counts(x), rank)
        assert floor <= ordered[rank] and (ordered >= floor).sum() < x.numel() * (1 - min(alphas)) + 10_000
        assert np.array_equal(quantiles(x, alphas, floor).numpy(), numpy_quantiles(x, alphas))


def test_quantile_exact_above_torch_quantile_limit():
    n = 2**24 + 1001
    x = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 5
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, 0.9995)
    alphas = [0.99, 0.9995, 0.99999, 1.0]
    assert np.array_equal(quantiles(x, alphas).numpy(), numpy_quantiles(x, alphas))


def test_percentile_observer_is_the_quamba_ema():
    gen = torch.Generator().manual_seed(3)
    samples = [torch.randn(33, 16, generator=gen) * (i + 1) for i in range(6)]
    obs = PercentileObserver(alpha=0.999, sigma=0.2)
    m = None
    for s in samples:
        p = float(np.quantile(s.abs().double().numpy(), 0.999).astype(np.float32))
        m = p if m is None else m + 0.2 * (p - m)
        assert float(obs.observe(s)) == np.float32(p)
    assert obs.result().dtype == torch.float32 and float(obs.result()) == np.float32(m)


@pytest.mark.parametrize("alpha,sigma", [(0.0, 0.01), (1.5, 0.01), (-0.1, 0.01), (0.99, 0.0), (0.99, 1.01)])
def test_percentile_rejects_alpha_and_sigma_outside_0_1(alpha, sigma):
    with pytest.raises(SsmqError, match="must be in \\(0, 1\\]"):
        PercentileObserver(alpha, sigma)


def test_minmax_per_tensor_channel_and_groups():
    gen = torch.Generator().manual_seed(4)
    samples = [torch.randn(5, 12, generator=gen) for _ in range(3)]
    allx = torch.cat(samples).abs()
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver((0,))
    grouped = MinMaxObserver((0,), contiguous_groups(12, 3))
    for s in samples:
        for obs in (per_tensor, per_channel, grouped):
            obs.observe(s)
    assert torch.equal(per_tensor.result(), allx.max())
    assert torch.equal(per_channel.result(), allx.amax(0))
    assert torch.equal(grouped.result(), allx.amax(0).reshape(3, 4).amax(1))
    with pytest.raises(SsmqError, match="cannot be split"):
        contiguous_groups(12, 5)


def test_mamba2_grouping_shapes_and_values():
    cfg = tiny_config("mamba2")  # d_inner 64, headdim 8 -> 8 heads, 2 SSD groups, d_state 8
    g, heads, hd, n = cfg.ngroups, cfg.nheads, cfg.headdim, cfg.d_state
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, heads * hd, generator=gen)
    obs = grouped_minmax("layers.0.conv.x", cfg, head_groups=2, channel_groups=4)
    obs.observe(x)
    cm = x.abs().amax(0)
    expected = torch.zeros(g, 2, 4)
    hpg = heads // g
    for h in range(heads):
        for p in range(hd):
            i = (h // hpg, (h % hpg) // (hpg // 2), p // (hd // 4))
            expected[i] = max(expected[i], cm[h * hd + p])
    assert torch.equal(obs.result(), expected)

    bc = torch.randn(7, g * n, generator=gen)
    obs = grouped_minmax("layers.1.conv.B", cfg)
    obs.observe(bc)
    assert torch.equal(obs.result(), bc.abs().amax(0).reshape(g, n).amax(1))

    state = torch.randn(heads, hd, n, generator=gen)
    obs = grouped_minmax("layers.1.ssm.state", cfg)
    obs.observe(state)
    expected = torch.stack([state[k * hpg:(k + 1) * hpg].abs().amax(dim=(0, 1)) for k in range(g)])
    assert obs.result().shape == (g, n) and torch.equal(obs.result(), expected)


def test_grouped_minmax_errors():
    cfg = tiny_config("mamba2")
    with pytest.raises(SsmqError, match="head groups"):
        mamba2_grouping("layers.0.conv.x", cfg, head_groups=3)
    with pytest.raises(SsmqError, match="channel groups"):
        mamba2_grouping("layers.0.conv.x", cfg, channel_groups=3)
    with pytest.raises(SsmqError, match="applies to the Mamba2 taps"):
        mamba2_grouping("layers.0.norm.out", cfg)
    with pytest.raises(SsmqError, match="for Mamba2 models"):
        mamba2_grouping("layers.0.conv.out", tiny_config("mamba1"))


def test_histogram_bins_edges_floor_and_nonfinite():
    x = torch.tensor([1.0, 1.0 + 2**-8, 1.0 + 2**-7, 0.0, 1e-30, 2.0, float("inf"), float("nan")])
    counts = bin_counts(x.abs())
    assert int(counts.sum()) == 8 and int(nonfinite_count(counts)) == 2
    one = 127 << 7
    assert counts[one] == 2 and counts[one + 1] == 1 and counts[one + 128] == 1
    assert counts[FLOOR_BIN] == 2 and counts[NONFINITE_BIN:].sum() == 2


def test_histogram_estimates_are_within_one_bin():
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(300_000, generator=gen).abs(), torch.rand(100, generator=gen) * 40])
    hist = Histogram.from_dense(bin_counts(x))
    assert hist.total == x.numel() and hist.offset > FLOOR_BIN - 1
    absmax = float(x.max())
    for alpha in (0.5, 0.99, 0.9995, 0.99999, 1.0):
        exact = float(np.quantile(x.double().numpy(), alpha))
        assert math.isclose(hist.estimate_quantile(alpha, absmax), exact, rel_tol=RELATIVE_BIN_WIDTH)
    counts = hist.counts.numpy()
    for t in (0.1, 1.0, 2.5, 10.0, absmax, 2 * absmax):
        exact = float((x > t).double().mean())
        assert abs(hist.fraction_above(t, absmax) - exact) <= counts.max() / x.numel()
    assert hist.fraction_above(absmax, absmax) == 0.0
