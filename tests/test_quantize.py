"""Recipes end to end: quantize, save, strict reload, generation with int8 caches, and bad input."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

import ssmq
from ssmq.cli.main import cli
from ssmq.errors import SsmqError
from ssmq.eval.compare import layer_errors
from ssmq.ops.qtensor import QTensor
from ssmq.quant.qmodel import QUANT_CONFIG, load_quantized, save_quantized
from ssmq.quant.quantize import calibrate_for_recipe, quantize

from conftest import NEOX_TOKENIZER, random_ids

CAL = dict(n=3, seqlen=24, progress=False)


def neox_model(tmp_path, arch="mamba1", d_model=32, name="fp", seed=2):
    cfg = ssmq.MambaConfig(arch=arch, d_model=d_model, n_layer=2, vocab_size=50280, d_state=8, headdim=8,
                           ngroups=2, chunk_size=8)
    return ssmq.save(ssmq.build_model(cfg, seed=seed), tmp_path / name, tokenizer=NEOX_TOKENIZER)


def tree_digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return neox_model(tmp_path_factory.mktemp("q"))


@pytest.mark.parametrize("recipe", ["quamba1", "minmax-static", "dynamic"])
@torch.no_grad()
def test_recipe_save_load_is_bit_identical_and_source_untouched(tmp_path, fp_dir, recipe):
    before = tree_digest(fp_dir)
    qm = quantize(fp_dir, recipe, quantize_embedding=True, **CAL)
    out = save_quantized(qm, tmp_path / recipe, fp_dir / "tokenizer.json")
    again, tok = ssmq.load(out)
    ids = random_ids(50000, (2, 17))
    assert torch.equal(qm(ids), again(ids))
    assert tree_digest(fp_dir) == before
    qc = json.loads((out / QUANT_CONFIG).read_text())
    assert qc["recipe"]["name"] == recipe and qc["options"]["quantize_embedding"] is True
    assert set(qc["scales"]) == set(again.scales.names())
    assert again.backbone.embeddings.weight.dtype == torch.int8


@torch.no_grad()
def test_w8a8_logits_stay_close_to_fp_and_quamba1_beats_minmax(fp_dir):
    fp, _ = ssmq.load(fp_dir)
    ids = random_ids(50000, (1, 64), seed=3)
    errors = {r: layer_errors(fp, quantize(fp_dir, r, **CAL), ids) for r in ("quamba1", "minmax-static")}
    for r, e in errors.items():
        assert 0 < e["logits"] < 0.15, (r, e)
        assert e["layers.0.block.out"] < e["layers.1.block.out"] + 0.05  # errors accumulate with depth
    assert errors["quamba1"]["logits"] < errors["minmax-static"]["logits"]


@torch.no_grad()
def test_quantized_generation_keeps_int8_caches(tmp_path, fp_dir):
    qm = quantize(fp_dir, "quamba1", **CAL)
    _, tok = ssmq.load(fp_dir)
    cache = qm.new_cache()
    qm(random_ids(50000, (1, 9)), cache)
    assert isinstance(cache.ssm[0], QTensor) and cache.ssm[0].codes.dtype == torch.int8
    assert cache.conv[0].dtype == torch.int8
    assert torch.equal(cache.ssm[1].scale, qm.scales["layers.1.ssm.state"])
    g = ssmq.generate(qm, tok, "The cat", 5, stop_at_eos=False)
    assert len(g.new_ids) == 5


@torch.no_grad()
def test_one_scale_edit_reaches_every_consumer(fp_dir):
    qm = quantize(fp_dir, "quamba1", **CAL)
    ids = random_ids(50000, (1, 12))
    base = qm(ids)
    seen = []
    with qm.taps.hooked("layers.0.conv.out", lambda n, x: seen.append(x) and None):
        with qm.override_scales({"layers.0.conv.out": qm.scales["layers.0.conv.out"] * 4}):
            changed = qm(ids)
        qm(ids)
    assert not torch.equal(base, changed)
    # the conv output, as every consumer receives it, moves to the coarser grid: 4x the step
    step_before = seen[1].abs()[seen[1] != 0].min()
    step_during = seen[0].abs()[seen[0] != 0].min()
    assert torch.isclose(step_during, 4 * qm.scales["layers.0.conv.out"]) or step_during > step_before
    assert torch.equal(qm(ids), base)
    assert qm.scales.entry("layers.0.conv.out").edits == []


def test_stats_from_the_cli_path_and_their_checks(tmp_path, fp_dir):
    stats = calibrate_for_recipe(fp_dir, "quamba1", **CAL)
    qm = quantize(fp_dir, "quamba1", stats=stats)
    assert qm.quant_config["calibration"]["model"]["sha256"] == qm.quant_config["source_model"]["sha256"]
    with pytest.raises(SsmqError, match="transforms"):
        quantize(fp_dir, "minmax-static", stats=stats)
    other = neox_model(tmp_path, name="other", seed=9)
    with pytest.raises(SsmqError, match="another model"):
        quantize(other, "quamba1", stats=stats)
    del stats.taps["layers.1.conv.out"]
    with pytest.raises(SsmqError, match="layers.1.conv.out"):
        quantize(fp_dir, "quamba1", stats=stats)


def test_bad_input_writes_nothing(tmp_path, fp_dir):
    runner = CliRunner()
    result = runner.invoke(cli, ["quantize", str(fp_dir), "--recipe", "quamba2-w8a8", "-o", str(tmp_path / "o1")])
    assert result.exit_code == 2 and "applies to mamba2 models only" in result.output
    odd = neox_model(tmp_path, d_model=36, name="odd")  # d_inner 72 has no Hadamard rotation
    result = runner.invoke(cli, ["quantize", str(odd), "--n", "2", "--seqlen", "16", "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no Hadamard rotation of size 72" in result.output and "2560" in result.output
    result = runner.invoke(cli, ["quantize", str(fp_dir), "--recipe", "minmax-static", "--alpha", "0.99",
                                 "-o", str(tmp_path / "o3")])
    assert result.exit_code == 2 and "no percentile scales" in result.output
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())


def test_newer_format_version_and_missing_scale_are_refused(tmp_path, fp_dir):
    out = save_quantized(quantize(fp_dir, "minmax-static", **CAL), tmp_path / "q")
    path = out / QUANT_CONFIG
    qc = json.loads(path.read_text())
    del qc["scales"]["layers.1.out_proj.in"]
    path.write_text(json.dumps(qc))
    with pytest.raises(SsmqError, match="'scales.layers.1.out_proj.in' has no entry"):
        load_quantized(out)
    qc["format_version"] = 99
    path.write_text(json.dumps(qc))
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert result.exit_code == 2 and "format version 99 was written by a newer ssmq" in result.output


def test_cli_quantize_info_and_eval(tmp_path, fp_dir):
    runner = CliRunner()
    out = tmp_path / "qcli"
    result = runner.invoke(cli, ["quantize", str(fp_dir), "--n", "2", "--seqlen", "16", "--quantize-lm-head",
                                 "--rules", "layers.0.conv.out=percentile(alpha=1.0)", "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(cli, ["info", str(out), "--json"]).output)
    assert info["kind"] == "quantized" and info["quantization"]["recipe"] == "quamba1"
    assert info["quantization"]["options"]["rules"] == ["layers.0.conv.out=percentile(alpha=1.0)"]
    qm, _ = ssmq.load(out)
    assert qm.scales.entry("layers.0.conv.out").params["alpha"] == 1.0
    assert qm.scales.entry("layers.1.conv.out").params["alpha"] == 0.9995
    assert "norm_f.out" in qm.scales
    result = runner.invoke(cli, ["quantize", str(fp_dir), "-o", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
