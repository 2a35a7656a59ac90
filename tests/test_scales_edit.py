"""`ssmq scales set / derive`: new checkpoints with edited scales, provenance, and bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ssmq.quant.edit import derive_scales, set_scales
from ssmq.quant.qmodel import QUANT_CONFIG, load_quantized

from conftest import random_ids
from test_scales_helpers import (build_checkpoint, calibration_docs, per_document_abs_values, percentile_scale, run,
                                 tree_digest)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    ck = build_checkpoint(tmp_path_factory.mktemp("edit"))
    ck.digest = tree_digest(ck.q)
    return ck


@torch.no_grad()
def test_set_multiply_writes_a_new_checkpoint_that_every_consumer_reads(ck, tmp_path):
    out = tmp_path / "edited"
    result = run("scales", "set", ck.q, "--scale", "layers.1.conv.out", "--multiply", "1.5", "-o", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(ck.q) == ck.digest
    src, new = load_file(str(ck.q / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(new)
    for key in src:
        if key == "scales.layers.1.conv.out":
            assert torch.equal(new[key], src[key] * 1.5)
        else:
            assert torch.equal(new[key], src[key]), key
    assert (out / "tokenizer.json").read_bytes() == (ck.q / "tokenizer.json").read_bytes()
    qc = json.loads((out / QUANT_CONFIG).read_text())
    assert qc["edits"][-1]["op"] == "set" and qc["edits"][-1]["scales"] == ["layers.1.conv.out"]
    log = qc["scales"]["layers.1.conv.out"]["edits"]
    assert len(log) == 1 and log[0]["who"] and log[0]["new"] == pytest.approx(log[0]["old"] * 1.5, rel=1e-6)
    # the edited checkpoint computes what the source computes with the scale overridden in memory
    edited, source = load_quantized(out), load_quantized(ck.q)
    ids = random_ids(50000, (1, 12))
    with source.override_scales({"layers.1.conv.out": src["scales.layers.1.conv.out"] * 1.5}):
        assert torch.equal(edited(ids), source(ids))
    assert not torch.equal(edited(ids), source(ids))


def test_set_value_for_a_pattern_and_from_another_checkpoint(ck, tmp_path):
    result = set_scales(ck.q, tmp_path / "v", "layers.*.ssm.state", value=0.002)
    assert [c["name"] for c in result["changes"]] == ["layers.0.ssm.state", "layers.1.ssm.state"]
    scales = load_quantized(tmp_path / "v").scales
    assert scales["layers.0.ssm.state"].item() == scales["layers.1.ssm.state"].item() == pytest.approx(0.002)
    set_scales(ck.q, tmp_path / "f", "*.ssm.state", from_model=tmp_path / "v")
    again = load_quantized(tmp_path / "f").scales
    for name in ("layers.0.ssm.state", "layers.1.ssm.state"):
        assert torch.equal(again[name], scales[name])
    assert torch.equal(again["layers.0.conv.out"], load_quantized(ck.q).scales["layers.0.conv.out"])


def test_derive_rederives_from_statistics_as_the_observer_defines(ck, tmp_path):
    out = tmp_path / "q9999"
    result = run("scales", "derive", ck.q, "--stats", ck.stats, "--rule", "layers.*.conv.out=percentile(0.9999)",
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert tree_digest(ck.q) == ck.digest
    scales = load_quantized(out).scales
    values = per_document_abs_values(ck.fp, calibration_docs(ck.stats), ["layers.0.conv.out", "layers.1.conv.out"])
    for name, samples in values.items():
        expected = percentile_scale(samples, 0.9999)
        assert scales[name].item() == pytest.approx(expected, rel=1e-5)
        entry = scales.entry(name)
        assert entry.observer == "percentile" and entry.params == {"alpha": 0.9999, "sigma": 0.01}
        assert entry.stats["rule"] == "layers.*.conv.out=percentile(alpha=0.9999, sigma=0.01)"
        assert entry.edits[-1]["what"].startswith("derive layers.*.conv.out=percentile")
    assert torch.equal(scales["layers.0.ssm.state"], load_quantized(ck.q).scales["layers.0.ssm.state"])


def test_derive_later_rules_win_and_shape_mismatch_is_refused(ck, tmp_path):
    result = derive_scales(ck.q, ck.stats, ["layers.*.ssm.state=percentile(1.0)", "layers.1.ssm.state=minmax"],
                           tmp_path / "d")
    entries = load_quantized(tmp_path / "d").scales
    assert entries.entry("layers.0.ssm.state").params["alpha"] == 1.0
    assert entries.entry("layers.1.ssm.state").observer == "minmax"
    assert len(result["changes"]) == 2
    bad = run("scales", "derive", ck.q, "--stats", ck.stats, "--rule", "layers.0.conv.out=minmax(per=channel)",
              "-o", tmp_path / "bad")
    assert bad.exit_code == 2 and "shape (64,)" in bad.output and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--value", "0"], "value must be a finite number > 0"),
    (["--value", "-1"], "value must be a finite number > 0"),
    (["--value", "nan"], "value must be a finite number > 0"),
    (["--multiply", "inf"], "factor must be a finite number > 0"),
    (["--multiply", "0"], "factor must be a finite number > 0"),
    (["--multiply", "1e-45"], "is invalid"),  # the product underflows to 0
    (["--value", "1", "--multiply", "2"], "exactly one of value, multiply or from"),
    ([], "exactly one of value, multiply or from"),
])
def test_set_refuses_bad_values(ck, tmp_path, args, message):
    result = run("scales", "set", ck.q, "--scale", "layers.0.conv.out", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists() and tree_digest(ck.q) == ck.digest


def test_bad_names_outputs_and_statistics_are_refused(ck, tmp_path, tmp_path_factory):
    cases = [
        (["set", ck.q, "--scale", "layers.*.conv.outt", "--value", "1"], "close matches: layers.1.conv.out"),
        (["set", ck.q, "--scale", "layers.0.conv.out", "--from", ck.fp], "nor a Quamba"),
        (["derive", ck.q, "--stats", ck.stats, "--rule", "layers.*.nothing=minmax"], "matches no tap"),
        (["derive", ck.q, "--stats", ck.stats, "--rule", "layers.0.conv.out"], "malformed rule"),
    ]
    for args, message in cases:
        result = run("scales", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert not (tmp_path / "out").exists()
    for output in (ck.q, ck.q / "inside"):
        result = run("scales", "set", ck.q, "--scale", "layers.0.conv.out", "--multiply", "2", "-o", output)
        assert result.exit_code == 2 and "the output directory is the input checkpoint" in result.output
    other = build_checkpoint(tmp_path_factory.mktemp("other"), seed=5)
    result = run("scales", "derive", ck.q, "--stats", other.stats, "--rule", "*.conv.out=percentile(1.0)",
                 "-o", tmp_path / "out")
    assert result.exit_code == 2 and "statistics were collected on another model" in result.output
    assert not (tmp_path / "out").exists() and tree_digest(ck.q) == ck.digest


def test_edits_chain_and_keep_their_history(ck, tmp_path):
    first = set_scales(ck.q, tmp_path / "a", "layers.0.conv.out", multiply=2.0)["output"]
    set_scales(first, tmp_path / "b", "layers.0.conv.out", multiply=0.25)
    qc = json.loads((tmp_path / "b" / QUANT_CONFIG).read_text())
    assert [e["what"] for e in qc["edits"]] == ["layers.0.conv.out x 2.0", "layers.0.conv.out x 0.25"]
    log = qc["scales"]["layers.0.conv.out"]["edits"]
    assert len(log) == 2 and math.isclose(log[1]["new"], log[0]["old"] * 0.5, rel_tol=1e-6)
