"""Scale rules: observer syntax, rule order, layer ranges, presets, and their errors."""

import pytest

import ssmq
from ssmq.errors import SsmqError
from ssmq.quant.calibrate import scale_taps
from ssmq.quant.rules import PRESETS, RuleSet, parse_observer, parse_rule

from conftest import tiny_config


@pytest.fixture(scope="module")
def taps():
    return {arch: scale_taps(ssmq.build_model(tiny_config(arch), seed=None)) for arch in ("mamba1", "mamba2")}


@pytest.mark.parametrize("text,canonical", [
    ("minmax", "minmax"),
    ("minmax()", "minmax"),
    ("minmax(per=channel)", "minmax(per=channel)"),
    ("minmax(groups=4)", "minmax(groups=4)"),
    ("percentile", "percentile(alpha=0.9995, sigma=0.01)"),
    ("percentile(0.9999)", "percentile(alpha=0.9999, sigma=0.01)"),
    ("percentile( alpha = 1.0 , sigma=0.5 )", "percentile(alpha=1.0, sigma=0.5)"),
    ("grouped_minmax(head_groups=2)", "grouped_minmax(head_groups=2, channel_groups=4)"),
])
def test_observer_syntax_and_canonical_text(text, canonical):
    spec = parse_observer(text)
    assert str(spec) == canonical
    assert parse_observer(str(spec)) == spec


@pytest.mark.parametrize("text,message", [
    ("histogram", "unknown observer 'histogram'; known observers: minmax, grouped_minmax, percentile"),
    ("percentile(alpha=0)", "alpha must be in \\(0, 1\\]"),
    ("percentile(alpha=1.0001)", "alpha must be in \\(0, 1\\]"),
    ("percentile(sigma=0)", "sigma must be in \\(0, 1\\]"),
    ("percentile(sigma=2)", "sigma must be in \\(0, 1\\]"),
    ("percentile(alpha=abc)", "not a valid float"),
    ("percentile(gamma=0.5)", "unknown parameter 'gamma'"),
    ("percentile(alpha=0.9, alpha=0.8)", "given twice"),
    ("minmax(0.9)", "key=value"),
    ("minmax(per=row)", "per must be"),
    ("minmax(per=channel, groups=2)", "either per= or groups="),
    ("minmax(groups=0)", ">= 1"),
    ("percentile(0.99", "malformed observer"),
    ("percentile(0.99,)", "empty argument"),
])
def test_observer_errors(text, message):
    with pytest.raises(SsmqError, match=message):
        parse_observer(text)


@pytest.mark.parametrize("text", ["layers.*.conv.out", "=minmax", "layers.*.conv.out=", "layers.* .conv.out=minmax"])
def test_malformed_rules(text):
    with pytest.raises(SsmqError, match="malformed rule"):
        parse_rule(text)


def test_default_presets_follow_design(taps):
    m1 = RuleSet().assign("mamba1", taps["mamba1"])
    for name, (spec, _) in m1.items():
        if name.endswith(("conv.out", "ssm.state")):
            assert str(spec) == "percentile(alpha=0.9995, sigma=0.01)", name
        else:
            assert str(spec) == "minmax", name
    m2 = RuleSet().assign("mamba2", taps["mamba2"])
    assert {n for n, (s, _) in m2.items() if s.kind == "grouped_minmax"} == {
        f"layers.{i}.{t}" for i in (0, 1) for t in ("conv.x", "conv.B", "conv.C", "ssm.state")}


def test_later_rules_override_and_layer_ranges(taps):
    rules = RuleSet(["layers.*.conv.out=percentile(alpha=0.9999)", "layers.0-0.conv.out=percentile(alpha=1.0)",
                     "*.ssm.state=minmax(per=channel); norm_f.out=percentile(0.99)"])
    got = {n: str(s) for n, (s, _) in rules.assign("mamba1", taps["mamba1"]).items()}
    assert got["layers.0.conv.out"] == "percentile(alpha=1.0, sigma=0.01)"
    assert got["layers.1.conv.out"] == "percentile(alpha=0.9999, sigma=0.01)"
    assert got["layers.0.ssm.state"] == got["layers.1.ssm.state"] == "minmax(per=channel)"
    assert got["norm_f.out"] == "percentile(alpha=0.99, sigma=0.01)"
    assert got["layers.1.norm.out"] == "minmax"
    assert str(rules.assign("mamba1", taps["mamba1"])["layers.0.conv.out"][1]) == \
        "layers.0-0.conv.out=percentile(alpha=1.0, sigma=0.01)"


def test_a_leading_preset_replaces_the_default(taps):
    got = RuleSet("minmax; layers.1.conv.out=percentile").assign("mamba1", taps["mamba1"])
    assert str(got["layers.0.conv.out"][0]) == "minmax"
    assert got["layers.1.conv.out"][0].kind == "percentile"
    assert "quamba1" in PRESETS and RuleSet("quamba1").rules("mamba1") == RuleSet().rules("mamba1")


def test_pattern_matching_no_tap_lists_valid_names(taps):
    with pytest.raises(SsmqError) as err:
        RuleSet("layers.*.conv.x=minmax").assign("mamba1", taps["mamba1"])
    msg = str(err.value)
    assert "'layers.*.conv.x=minmax' matches no tap" in msg
    assert "layers.0-1.{norm.out, in_proj.out, conv.out, x_proj.out, dt_proj.out, ssm.state, out_proj.in}" in msg
    assert msg.endswith("norm_f.out")
    with pytest.raises(SsmqError, match="matches no tap"):
        RuleSet("layers.5.conv.out=minmax").assign("mamba1", taps["mamba1"])
    with pytest.raises(SsmqError, match="matches no tap"):  # taps without a scale are not rule targets
        RuleSet("layers.*.conv.pre_act=minmax").assign("mamba1", taps["mamba1"])


def test_preset_errors(taps):
    with pytest.raises(SsmqError, match="preset 'quamba2' is for mamba2 models; this model is mamba1"):
        RuleSet("quamba2").assign("mamba1", taps["mamba1"])
    mamba2_quamba1 = RuleSet("quamba1").assign("mamba2", taps["mamba2"])  # its Mamba2 variant: conv.x is u
    assert str(mamba2_quamba1["layers.0.conv.x"][0]) == "percentile(alpha=0.9995, sigma=0.01)"
    assert str(mamba2_quamba1["layers.0.conv.B"][0]) == "minmax"
    with pytest.raises(SsmqError, match="unknown preset 'quamba9'"):
        RuleSet("quamba9")
    with pytest.raises(SsmqError, match="malformed layer range"):
        RuleSet("layers.3-1.conv.out=minmax").assign("mamba1", taps["mamba1"])
