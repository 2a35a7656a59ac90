"""The 4-bit recipes end to end (Mamba1): quamba2-w4a8 and quamba2-w4a16 with every embedding / lm_head
option combination, saved and strictly reloaded with identical logits; packed storage; bad input."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ssmq
from ssmq.cli.main import cli
from ssmq.errors import SsmqError
from ssmq.eval.compare import layer_errors
from ssmq.models.checkpoint import SAFETENSORS
from ssmq.models.layers import RMSNorm
from ssmq.ops.int4 import unpack_int4
from ssmq.quant.int4_modules import Int4Embedding, W4A8Linear, W4A16Linear
from ssmq.quant.modules import QuantRMSNorm, W8A8DeltaProjection, W8A8Linear
from ssmq.quant.qmodel import QUANT_CONFIG, load_quantized, save_quantized
from ssmq.quant.quantize import calibrate_for_recipe, quantize

from conftest import distinct_segment_scales, random_ids

CAL = dict(n=3, seqlen=24, progress=False)
OPTIONS = [(False, False), (True, False), (False, True), (True, True)]


VOCAB = 4096
TOKENIZER = Path(ssmq.__file__).parent / "fixtures" / "tiny-mamba1" / "tokenizer.json"  # 4096 ids: a small lm_head


def tiny_model(directory, arch: str):
    cfg = ssmq.MambaConfig(arch=arch, d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=8, ngroups=2,
                           chunk_size=8)
    return ssmq.save(ssmq.build_model(cfg, seed=4), directory / "fp", tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("w4"), "mamba1")


@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.no_grad()
def test_every_option_combination_round_trips(tmp_path, fp_dir, recipe, arch):
    if arch == "mamba2":
        fp_dir = tiny_model(tmp_path, arch)
    ids = random_ids(VOCAB, (2, 13))
    stats = calibrate_for_recipe(fp_dir, recipe, **CAL) if recipe == "quamba2-w4a8" else None  # shared by all four
    for embedding, lm_head in OPTIONS:
        qm = quantize(fp_dir, recipe, stats=stats, quantize_embedding=embedding, quantize_lm_head=lm_head, **CAL)
        out = save_quantized(qm, tmp_path / f"{recipe}-{embedding}-{lm_head}", fp_dir / "tokenizer.json")
        again, _ = ssmq.load(out)
        assert torch.equal(qm(ids), again(ids)), (embedding, lm_head)
        qc = json.loads((out / QUANT_CONFIG).read_text())
        assert qc["gptq"]["damp"] == 0.01 and qc["gptq"]["group_size"] == 128 and not qc["gptq"]["sequential"]
        assert qc["gptq"]["data"]["n"] == 3
        assert ("reorder_heads" in qc["transforms"]) == (arch == "mamba2" and recipe == "quamba2-w4a8")
        assert isinstance(again.backbone.embeddings, Int4Embedding) == embedding
        assert isinstance(again.lm_head, (W4A8Linear, W4A16Linear)) == lm_head


@torch.no_grad()
def test_w4a8_plan_storage_and_accuracy(tmp_path, fp_dir):
    qm = quantize(fp_dir, "quamba2-w4a8", quantize_lm_head=True, **CAL)
    mixer = qm.backbone.layers[0].mixer
    for lin in (mixer.in_proj, mixer.x_proj, mixer.out_proj, qm.lm_head):
        assert isinstance(lin, W4A8Linear)
    assert isinstance(mixer.dt_proj, W8A8DeltaProjection) and isinstance(qm.backbone.layers[0].norm, QuantRMSNorm)
    assert isinstance(qm.backbone.norm_f, QuantRMSNorm)
    assert "layers.0.in_proj.out" in qm.scales.names() and "norm_f.out" in qm.scales.names()
    out = save_quantized(qm, tmp_path / "q", fp_dir / "tokenizer.json")
    tensors = load_file(str(out / SAFETENSORS))
    key = "backbone.layers.0.mixer.in_proj."
    # in_proj is (2 * d_inner, d_model) = (128, 32): packed (128, 16), one group of 32 per row
    assert tensors[key + "weight"].dtype == torch.uint8 and tensors[key + "weight"].shape == (128, 16)
    assert tensors[key + "weight_scale"].shape == (128,) and tensors[key + "group_scale"].dtype == torch.int16
    codes = unpack_int4(tensors[key + "weight"])
    assert codes.min() >= -8 and codes.max() <= 7 and codes.min() < 0 < codes.max()
    # out_proj has K = d_inner = 64 (one group); lm_head K = 32
    assert tensors["backbone.layers.1.mixer.out_proj.group_scale"].shape == (32, 1)
    fp, _ = ssmq.load(fp_dir)
    err = layer_errors(fp, qm, random_ids(VOCAB, (1, 48), seed=5))["logits"]
    assert 0 < err < 0.3


@torch.no_grad()
def test_w4a16_is_weight_only(fp_dir):
    qm = quantize(fp_dir, "quamba2-w4a16", quantize_lm_head=True, **CAL)
    assert len(qm.scales) == 0
    block = qm.backbone.layers[1]
    assert isinstance(block.norm, RMSNorm) and isinstance(block.mixer.in_proj, W4A16Linear)
    assert isinstance(block.mixer.out_proj, W4A16Linear) and isinstance(qm.lm_head, W4A16Linear)
    assert not isinstance(block.mixer.dt_proj, (W8A8Linear, W4A16Linear))  # dt_proj stays fp16
    seen = []
    with qm.taps.hooked("layers.*.in_proj.out", lambda name, x: seen.append(x.dtype)):
        qm(random_ids(VOCAB, (1, 9)))
    assert seen == [torch.float16, torch.float16]
    fp, _ = ssmq.load(fp_dir)
    assert 0 < layer_errors(fp, qm, random_ids(VOCAB, (1, 48), seed=6))["logits"] < 0.3


def test_bad_input_is_refused(tmp_path, fp_dir):
    with pytest.raises(SsmqError, match="quantizes weights only; --alpha and --rules do not apply"):
        quantize(fp_dir, "quamba2-w4a16", alpha=0.999, **CAL)
    with pytest.raises(SsmqError, match="takes no calibration statistics"):
        quantize(fp_dir, "quamba2-w4a16", stats=tmp_path / "stats", **CAL)
    cfg = ssmq.MambaConfig(arch="mamba1", d_model=160, n_layer=1, vocab_size=VOCAB, d_state=8)
    odd = ssmq.save(ssmq.build_model(cfg, seed=0), tmp_path / "odd", tokenizer=TOKENIZER)
    for recipe in ("quamba2-w4a16", "quamba2-w4a8"):
        with pytest.raises(SsmqError, match="backbone.layers.0.mixer.in_proj.*K=160.*group size 128"):
            quantize(odd, recipe, **CAL)


def test_reload_is_strict_about_packed_tensors(tmp_path, fp_dir):
    qm = quantize(fp_dir, "quamba2-w4a8", **CAL)
    out = save_quantized(qm, tmp_path / "q", fp_dir / "tokenizer.json")
    tensors = load_file(str(out / SAFETENSORS))
    del tensors["backbone.layers.1.mixer.out_proj.group_scale"]
    save_file(tensors, str(out / SAFETENSORS), metadata={"format": "ssmq-quantized"})
    with pytest.raises(SsmqError, match="backbone.layers.1.mixer.out_proj.group_scale"):
        load_quantized(out)


def test_cli_quantize_w4a8_then_info(tmp_path, fp_dir):
    runner = CliRunner()
    out = tmp_path / "qcli"
    result = runner.invoke(cli, ["quantize", str(fp_dir), "--recipe", "quamba2-w4a8", "--n", "2", "--seqlen", "16",
                                 "--quantize-embedding", "-o", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(cli, ["info", str(out), "--json"]).output)
    assert info["quantization"]["recipe"] == "quamba2-w4a8"
    qm, _ = ssmq.load(out)
    assert isinstance(qm.backbone.embeddings, Int4Embedding)
    result = runner.invoke(cli, ["quantize", str(fp_dir), "--recipe", "quamba2-w4a16", "--alpha", "0.99",
                                 "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "quantizes weights only" in result.output
    assert not (tmp_path / "bad").exists()


@torch.no_grad()
def test_mamba2_w4a8_decoding_step_runs_in_proj_and_conv_as_one_op(monkeypatch):
    """A quamba2-w4a8 Mamba2 decoding step calls dispatch.w4a8_linear_conv_step (in_proj with the conv's
    one-token step) and gets exactly the logits and states of the two ops run apart, which a hook on
    `in_proj.B` forces; a prefill never takes it."""
    from ssmq.bench.models import random_quantized_model
    from ssmq.ops import dispatch

    cfg = ssmq.MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8, headdim=8, ngroups=2,
                           chunk_size=8)
    qm = random_quantized_model(cfg, "cpu", "quamba2-w4a8", seed=5)
    distinct_segment_scales(qm)
    ids = random_ids(VOCAB, (2, 7), seed=6)
    joint = dispatch.w4a8_linear_conv_step
    calls = []
    monkeypatch.setattr(dispatch, "w4a8_linear_conv_step", lambda *a, **kw: calls.append(a[0].shape) or joint(*a, **kw))

    def decode():
        cache = qm.new_cache()
        logits = torch.cat([qm(ids[:, :4], cache)] + [qm(ids[:, t:t + 1], cache) for t in range(4, 7)], dim=1)
        return logits, cache.conv

    logits, conv = decode()
    assert len(calls) == 3 * cfg.n_layer and all(shape[1] == 1 for shape in calls)
    calls.clear()
    with qm.taps.hooked("layers.*.in_proj.B", lambda name, x: None):
        apart, apart_conv = decode()
    assert not calls
    assert torch.equal(logits, apart) and all(torch.equal(a, b) for a, b in zip(conv, apart_conv))
