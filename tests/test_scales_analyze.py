"""`ssmq scales analyze`: the conv scale chain, clipping / utilisation / SQNR from statistics (checked
against direct computations), the pre/post-SiLU range, Mamba2 grouped scales, and the plot."""

import math

import numpy as np
import pytest
import torch

import ssmq
from ssmq.data import CalibrationData
from ssmq.quant.analyze import analyze_scales, sqnr_db
from ssmq.quant.calibrate import calibrate
from ssmq.quant.histogram import Histogram, bin_counts
from ssmq.quant.inspect import ScaleSource
from ssmq.quant.qmodel import load_quantized
from ssmq.quant.scalebook import ScaleBook, ScaleEntry

from conftest import random_ids, tiny_config
from test_scales_helpers import build_checkpoint, calibration_docs, per_document_abs_values, run

PNG = b"\x89PNG\r\n\x1a\n"
SILU_MIN = -0.2784645427610738


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("analyze"))


@pytest.fixture(scope="module")
def analysis(ck):
    return analyze_scales(ck.q, ck.stats, docs=3)


def test_conv_scale_chain_matches_the_modules(ck, analysis):
    qm = load_quantized(ck.q)
    for row in analysis["layers"]:
        i = row["layer"]
        x = qm.scales[f"layers.{i}.in_proj.out"].item()
        w = qm.backbone.layers[i].mixer.conv1d.weight_scale.item()
        out = qm.scales[f"layers.{i}.conv.out"].item()
        assert row["x_scale"] == x and row["w_scale"] == w and row["x_out_scale"] == out
        assert row["wx_scale"] == pytest.approx(w * x, rel=1e-6)
        assert row["ratio"] == pytest.approx(out / (w * x), rel=1e-6)
    assert [r["layer"] for r in analysis["layers"]] == [0, 1]


def test_clipping_utilisation_and_sqnr_per_scale(ck, analysis):
    rows = {r["name"]: r for r in analysis["scales"]}
    assert len(rows) == 14
    for name, r in rows.items():
        if name.endswith(("conv.out", "ssm.state")):  # percentile scales clip the tail
            assert r["clipped"] > 0 and r["sqnr_db"] != r["sqnr_minmax_db"]
        else:  # min-max scales clip nothing and are their own reference
            assert r["clipped"] == 0 and r["sqnr_db"] == pytest.approx(r["sqnr_minmax_db"], rel=1e-6)
            assert 0.5 < r["utilisation"] <= 1
    # the conv output of layer 0, directly: fraction of calibration values above 127·s
    docs = calibration_docs(ck.stats)
    values = np.concatenate(per_document_abs_values(ck.fp, docs, ["layers.0.conv.out"])["layers.0.conv.out"])
    r = rows["layers.0.conv.out"]
    direct = float((values > 127 * r["scale"]).mean())
    assert r["clipped"] == pytest.approx(direct, abs=2 / values.size)
    assert r["utilisation"] == pytest.approx(np.quantile(values, 0.999) / (127 * r["scale"]), rel=0.01)


@pytest.mark.parametrize("scale_of_max", [1 / 127, 1 / 60, 1 / 400, 1 / 5000])
def test_sqnr_from_histogram_matches_direct_computation(scale_of_max):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    a = x.abs()
    absmax = a.max().item()
    s = absmax * scale_of_max
    q = torch.clamp(torch.round(x / s), -127, 127) * s
    direct = 10 * math.log10(float((x.double() ** 2).sum() / ((x - q).double() ** 2).sum()))
    counts, lower, upper = Histogram.from_dense(bin_counts(a)).bins()
    assert sqnr_db(counts, lower, upper, absmax, s) == pytest.approx(direct, abs=0.1)


@torch.no_grad()
def test_pre_and_post_silu_ranges(ck, analysis):
    ranges = analysis["conv_ranges"]
    assert analysis["conv_ranges_docs"] == 3 and [r["layer"] for r in ranges] == [0, 1]
    taps = ["layers.0.conv.pre_act", "layers.1.conv.pre_act"]
    pre = per_document_abs_values(ck.fp, calibration_docs(ck.stats)[:3], taps)
    for r in ranges:
        assert r["post_max"] == pytest.approx(torch.nn.functional.silu(torch.tensor(r["pre_max"])).item(), rel=1e-6)
        assert SILU_MIN <= r["post_min"] < 0 and r["pre_min"] < -1.5 * abs(r["post_min"])
        fp_pre = np.concatenate(pre[f"layers.{r['layer']}.conv.pre_act"])
        assert max(abs(r["pre_min"]), r["pre_max"]) == pytest.approx(fp_pre.max(), rel=0.1)


def test_cli_tables_and_plot(ck, tmp_path):
    result = run("scales", "analyze", ck.q, "--stats", ck.stats, "--plot", tmp_path / "a.png", "--docs", "2")
    assert result.exit_code == 0, result.output
    for header in ("x_out/wx", "SQNR dB", "post-SiLU max", f"plot written to {tmp_path / 'a.png'}"):
        assert header in result.output
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG
    plain = run("scales", "analyze", ck.q)
    assert plain.exit_code == 0 and "SQNR" not in plain.output
    result = run("scales", "analyze", ck.q, "--plot", tmp_path / "missing" / "a.png")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_mamba2_grouped_scales_with_statistics():
    """Grouped scales: exact count of groups whose max |x| exceeds 127·s, clipping as a lower bound."""
    cfg = tiny_config("mamba2")
    model = ssmq.build_model(cfg, seed=1)
    docs = [random_ids(cfg.vocab_size, (24,), seed=i).tolist() for i in range(3)]
    stats = calibrate(model, data=CalibrationData.from_token_ids(docs), progress=False)
    stats.provenance["model"]["sha256"] = "m"
    stats.provenance["transforms"] = []
    entries = {}
    for name, tap in stats.taps.items():
        entries[name] = ScaleEntry(tap.scale(), tap.observer.kind, dict(tap.observer.params))
    shrunk = entries["layers.0.conv.x"].value
    assert shrunk.shape == (2, 4, 4)
    shrunk.view(-1)[[3, 17]] *= 0.5
    source = ScaleSource("<test>", "ssmq", "mamba2", 2, ScaleBook(entries), {},
                         {0: torch.tensor(0.01), 1: torch.tensor(0.02)},
                         {"source_model": {"sha256": "m"}, "transforms": []})
    result = analyze_scales(source, stats, docs=0)
    rows = {r["name"]: r for r in result["scales"]}
    x = rows["layers.0.conv.x"]
    assert x["grouped"] and x["groups_clipping"] == [2, 32] and x["sqnr_db"] is None
    assert x["clipped"] == 0  # against the largest group scale, a lower bound
    assert rows["layers.1.conv.x"]["groups_clipping"] == [0, 32]
    assert rows["layers.0.conv.B"]["groups_clipping"] == [0, 2]
    chain = result["layers"][0]
    assert chain["x_out_scale"]["shape"] == [2, 4, 4]
    wx = 0.01 * stats.tap("layers.0.in_proj.x").scale().item()
    assert chain["ratio"]["max"] == pytest.approx(shrunk.max().item() / wx, rel=1e-6)
