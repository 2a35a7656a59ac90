"""The statistics store: re-derivation equals live observers, estimates, save/load, errors."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ssmq
from ssmq.data import CalibrationData
from ssmq.errors import SsmqError
from ssmq.quant import stats as stats_module
from ssmq.quant.calibrate import run_calibration
from ssmq.quant.histogram import RELATIVE_BIN_WIDTH
from ssmq.quant.observers import MinMaxObserver, PercentileObserver, channel_reduce_dims, grouped_minmax
from ssmq.quant.stats import DEFAULT_ALPHAS, CalibrationStats

from conftest import random_ids, tiny_config

LENGTHS = (48, 64, 9, 64, 33)


@pytest.fixture(scope="module")
def calibrated():
    """Per architecture: a tiny model, its data and its statistics (batch size 1)."""
    out = {}
    for arch in ("mamba1", "mamba2"):
        model = ssmq.build_model(tiny_config(arch), seed=7)
        data = CalibrationData.from_token_ids([random_ids(128, (n,), seed=n + i).tolist()
                                               for i, n in enumerate(LENGTHS)])
        rules = "layers.1.norm.out=percentile(alpha=0.95, sigma=0.2)"
        out[arch] = model, data, run_calibration(model, data, rules, progress=False)
    return out


def live(model, data, tap, observer):
    """Run `observer` directly on one tap, one document at a time."""
    def hook(name, x):
        observer.observe(x[0])
    with torch.no_grad(), model.taps.hooked(tap, hook):
        for ids in data.token_ids:
            model.backbone(torch.tensor([ids]), None)
    return observer.result()


@pytest.mark.parametrize("tap", ["layers.0.conv.out", "layers.1.ssm.state", "layers.0.dt_proj.out", "norm_f.out"])
def test_mamba1_derivations_equal_live_observers(calibrated, tap):
    model, data, stats = calibrated["mamba1"]
    dims = channel_reduce_dims("mamba1", tap)
    assert torch.equal(stats.derive(tap, "minmax"), live(model, data, tap, MinMaxObserver()))
    assert torch.equal(stats.derive(tap, "minmax(per=channel)"), live(model, data, tap, MinMaxObserver(dims)))
    for alpha, sigma in ((0.9995, 0.01), (0.99, 0.3), (1.0, 1.0), (0.99999, 0.5)):
        expected = live(model, data, tap, PercentileObserver(alpha, sigma))
        assert torch.equal(stats.derive(tap, f"percentile(alpha={alpha}, sigma={sigma})"), expected)


@pytest.mark.parametrize("tap", ["layers.0.conv.x", "layers.1.conv.B", "layers.0.in_proj.C", "layers.1.ssm.state"])
def test_mamba2_grouped_derivations_equal_live_observers(calibrated, tap):
    model, data, stats = calibrated["mamba2"]
    expected = live(model, data, tap, grouped_minmax(tap, model.config, head_groups=2, channel_groups=2))
    assert torch.equal(stats.derive(tap, "grouped_minmax(head_groups=2, channel_groups=2)"), expected)


def test_rule_values_and_grid(calibrated):
    model, data, stats = calibrated["mamba1"]
    assert stats.alphas == tuple(sorted(DEFAULT_ALPHAS + (0.95,)))
    t = stats.tap("layers.1.norm.out")
    assert str(t.observer) == "percentile(alpha=0.95, sigma=0.2)"
    assert torch.equal(t.value, live(model, data, "layers.1.norm.out", PercentileObserver(0.95, 0.2)))
    conv = stats.tap("layers.0.conv.out")
    assert conv.sample_quantiles.shape == (data.n, len(stats.alphas))
    assert conv.count == sum(LENGTHS) * model.config.d_inner
    assert conv.absmax == float(conv.sample_quantiles[:, -1].max())
    assert torch.equal(conv.scale(), (conv.value / 127).clamp(min=1e-6))
    summary = stats.summary()["layers.0.conv.out"]
    assert summary["quantile_ema"]["0.9995"] == float(conv.value)
    with pytest.raises(SsmqError, match="not in the stored grid"):
        stats.derive("layers.0.conv.out", "percentile(alpha=0.9)")
    wider = run_calibration(model, data, extra_alphas=[0.9], progress=False)
    expected = live(model, data, "layers.0.conv.out", PercentileObserver(0.9, 0.01))
    assert torch.equal(wider.derive("layers.0.conv.out", "percentile(alpha=0.9)"), expected)
    with pytest.raises(SsmqError, match="alpha must be in"):
        run_calibration(model, data, extra_alphas=[1.5], progress=False)
    with pytest.raises(SsmqError, match="close matches: layers.0.conv.out"):
        stats.tap("layers.0.conv.outt")


def test_histogram_estimates_match_pooled_data(calibrated):
    model, data, stats = calibrated["mamba1"]
    tap = "layers.1.conv.out"
    pooled = []
    with torch.no_grad(), model.taps.hooked(tap, lambda name, x: pooled.append(x[0].abs().flatten())):
        for ids in data.token_ids:
            model.backbone(torch.tensor([ids]), None)
    values = torch.cat(pooled).double().numpy()
    for alpha in (0.5, 0.9, 0.999, 1.0):
        exact = float(np.quantile(values, alpha))
        assert math.isclose(stats.estimate_quantile(tap, alpha), exact, rel_tol=RELATIVE_BIN_WIDTH)
    for scale in (0.001, 0.005, 0.01):
        exact = float((values > 127 * scale).mean())
        assert abs(stats.clipped_fraction(tap, scale) - exact) < 0.002
    assert stats.clipped_fraction(tap, stats.tap(tap).absmax / 127) == 0.0


def test_save_load_round_trip(calibrated, tmp_path):
    _, _, stats = calibrated["mamba2"]
    loaded = CalibrationStats.load(stats.save(tmp_path / "stats"))
    assert loaded.alphas == stats.alphas and loaded.sigma == stats.sigma
    assert loaded.provenance == json.loads(json.dumps(stats.provenance))
    assert loaded.config == stats.config and list(loaded.taps) == list(stats.taps)
    for name, t in stats.taps.items():
        u = loaded.taps[name]
        assert (u.observer, u.count, u.histogram.offset) == (t.observer, t.count, t.histogram.offset)
        for field in ("channel_absmax", "sample_quantiles", "value"):
            assert torch.equal(getattr(u, field), getattr(t, field)), (name, field)
        assert torch.equal(u.histogram.counts, t.histogram.counts)
    spec = "grouped_minmax"
    assert torch.equal(loaded.derive("layers.0.conv.x", spec), stats.derive("layers.0.conv.x", spec))


def test_save_refuses_non_empty_output_and_is_atomic(calibrated, tmp_path, monkeypatch):
    _, _, stats = calibrated["mamba1"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(SsmqError, match="exists and is not empty"):
        stats.save(target)
    stats.save(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["stats.json", "stats.safetensors"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(stats_module, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        stats.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_errors(calibrated, tmp_path):
    _, _, stats = calibrated["mamba1"]
    with pytest.raises(SsmqError, match="not a calibration statistics directory"):
        CalibrationStats.load(tmp_path)
    d = stats.save(tmp_path / "s")
    tensors = load_file(str(d / "stats.safetensors"))
    del tensors["layers.1.ssm.state/histogram"]
    save_file(tensors, str(d / "stats.safetensors"))
    with pytest.raises(SsmqError, match="missing tensor 'layers.1.ssm.state/histogram'"):
        CalibrationStats.load(d)
    meta = json.loads((d / "stats.json").read_text())
    (d / "stats.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(SsmqError, match="not ssmq-calibration-stats version 1"):
        CalibrationStats.load(d)
