"""`ssmq scales list / explain / diff` on ssmq checkpoints: rows, consumers checked against the real
forward, explanations, diffs, and bad input."""

import json

import pytest
import torch

import ssmq
from ssmq.ops.qtensor import QTensor
from ssmq.quant.edit import derive_scales
from ssmq.quant.inspect import diff_scales, explain_scale, flow, list_scales, module_path
from ssmq.quant.qmodel import load_quantized, save_quantized
from ssmq.quant.quantize import quantize

from conftest import NEOX_TOKENIZER, random_ids
from test_scales_helpers import build_checkpoint, run


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("inspect"))


def test_list_has_one_row_per_scale_with_its_value_and_provenance(ck):
    result = list_scales(ck.q)
    qm = load_quantized(ck.q)
    assert [r["name"] for r in result["scales"]] == qm.scales.names()
    assert len(result["scales"]) == 14
    for r in result["scales"]:
        assert r["value"] == pytest.approx(qm.scales[r["name"]].item(), rel=0, abs=0)
        assert r["layer"] == int(r["name"].split(".")[1]) and r["name"].endswith(r["tap"])
    by_name = {r["name"]: r for r in result["scales"]}
    conv = by_name["layers.1.conv.out"]
    assert conv["quamba_key"] == "x_proj:input"
    assert conv["observer"] == "percentile" and conv["params"] == {"alpha": 0.9995, "sigma": 0.01}
    assert conv["producer"] == "conv1d output (quantize)"
    assert conv["consumers"] == ["x_proj input (requantize)", "SSM u (dequantize)"]
    assert by_name["layers.0.norm.out"]["observer"] == "minmax"
    assert result["summary"] == {"scales": 14, "observers": {"minmax": 10, "percentile": 4},
                                 "percentile": {"conv.out": "0-1", "ssm.state": "0-1"}}


def test_list_filters_and_cli_output(ck):
    rows = list_scales(ck.q, layers="1", match="*.conv.out")["scales"]
    assert [r["name"] for r in rows] == ["layers.1.conv.out"]
    assert len(list_scales(ck.q, layers="0-1")["scales"]) == 14
    result = run("scales", "list", ck.q, "--layers", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(list_scales(ck.q, layers="1")))
    text = run("scales", "list", ck.q).output
    assert "layers.0.conv.out" in text and "x_proj:input" in text and "percentile(α=0.9995 σ=0.01)" in text
    assert "percentile observers: conv.out in layers 0-1; ssm.state in layers 0-1" in text


@pytest.mark.parametrize("args, message", [
    (["--match", "layers.*.conv.outt"], "close matches: layers.1.conv.out, layers.0.conv.out"),
    (["--layers", "7"], "has layers 0-1"),
    (["--layers", "1", "--match", "layers.0.*"], "matches no scale"),
])
def test_list_bad_selection_exits_2(ck, args, message):
    result = run("scales", "list", ck.q, *args)
    assert result.exit_code == 2 and message in result.output


@torch.no_grad()
def test_consumers_are_the_modules_that_receive_the_scale_in_the_forward(ck):
    """For each scale, give it a distinctive value and record which quantized modules get a QTensor
    carrying it as input (consumers) or return one (producer), over a prefill and a decode step."""
    qm = load_quantized(ck.q)
    plan_modules = set(qm.quant_config["plan"])
    for name in qm.scales.match("layers.1.*"):
        value = qm.scales[name] * 1.37
        seen = {"in": set(), "out": set()}

        def carries(obj):
            if isinstance(obj, QTensor):
                return obj.scale.shape == value.shape and torch.equal(obj.scale, value)
            return isinstance(obj, (tuple, list)) and any(carries(o) for o in obj)

        handles = []
        for path in plan_modules:
            module = qm.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, p=path: seen["in"].add(p) if carries(args) else None))
            handles.append(module.register_forward_hook(
                lambda m, args, out, p=path: seen["out"].add(p) if carries(out) else None))
        with qm.override_scales({name: value}):
            cache = qm.new_cache()
            qm(random_ids(50000, (1, 6)), cache)
            qm(random_ids(50000, (1, 1), seed=1), cache)
        for h in handles:
            h.remove()
        producer, consumers, _ = flow("mamba1", name)
        assert seen["in"] == {module_path(name, u.module) for u in consumers}, name
        assert module_path(name, producer.module) in seen["out"], name


def test_explain_says_where_observed_stored_and_consumed(ck):
    e = explain_scale(ck.q, "layers.1.conv.out")
    assert e["observed"]["site"].endswith("(ssmq/models/mamba1.py)")
    assert "SSM input u" in e["observed"]["tensor"]
    assert e["statistic"]["observer"] == "percentile" and "α=0.9995" in e["statistic"]["description"]
    assert e["statistic"]["calibration"]["rule"] == "layers.*.conv.out=percentile(alpha=0.9995, sigma=0.01)"
    assert e["stored"][0] == "model.safetensors: scales.layers.1.conv.out"
    assert e["producer"]["module"] == "backbone.layers.1.mixer.conv1d" and e["producer"]["kind"] == "conv1d_silu_q8"
    assert [(u["module"], u["action"]) for u in e["consumers"]] == [
        ("backbone.layers.1.mixer.x_proj", "requantize"), ("backbone.layers.1.mixer.scan", "dequantize")]
    assert "Hadamard" in explain_scale(ck.q, "layers.0.out_proj.in")["observed"]["note"]
    text = run("scales", "explain", ck.q, "layers.1.conv.out").output
    assert "Mamba1Mixer.forward" in text and "backbone.layers.1.mixer.x_proj [w8a8_linear] input: requantize" in text


def test_explain_unknown_scale_lists_close_matches(ck):
    result = run("scales", "explain", ck.q, "layers.1.conv.ot")
    assert result.exit_code == 2
    assert "unknown scale 'layers.1.conv.ot'; close matches: layers.1.conv.out" in result.output


def test_diff_reports_relative_changes_unmoved_and_one_sided_scales(ck, tmp_path):
    derived = derive_scales(ck.q, ck.stats, ["layers.*.conv.out=percentile(0.9999)"], tmp_path / "d")["output"]
    a, b = load_quantized(ck.q).scales, load_quantized(derived).scales
    d = diff_scales(ck.q, derived)
    rows = {r["name"]: r for r in d["scales"]}
    for name in ("layers.0.conv.out", "layers.1.conv.out"):
        assert rows[name]["rel"] == pytest.approx((b[name] / a[name] - 1).item(), rel=1e-6)
        assert rows[name]["flag"] == ""
        assert "α=0.9995" in rows[name]["observer"] and "α=0.9999" in rows[name]["observer"]
    assert sorted(d["unchanged"]) == sorted(n for n in a.names() if not n.endswith("conv.out"))
    assert d["only_a"] == d["only_b"] == []

    with_head = quantize(ck.fp, "quamba1", stats=ck.stats, quantize_lm_head=True, progress=False)
    head_dir = save_quantized(with_head, tmp_path / "head", NEOX_TOKENIZER)
    d = diff_scales(ck.q, head_dir)
    assert d["only_b"] == ["norm_f.out"] and d["only_a"] == [] and len(d["unchanged"]) == 14

    text = run("scales", "diff", ck.q, derived, "--rel").output.splitlines()
    assert text[2].startswith("layers.0.conv.out") or text[2].startswith("layers.1.conv.out")
    assert "14 scales in both: 2 moved, 12 unchanged" in text[-1]
    assert "only in B (1): norm_f.out" in run("scales", "diff", ck.q, head_dir).output


def test_in_memory_model_lists_like_its_directory(ck):
    qm, _ = ssmq.load(ck.q)
    assert list_scales(qm)["scales"] == list_scales(ck.q)["scales"]
