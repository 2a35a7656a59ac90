"""The benchmark library and `ssmq bench` on the CPU (tiny shapes; real timings need a GPU)."""

import json

import torch
from click.testing import CliRunner

import ssmq

from ssmq.bench.graphs import static_cache
from ssmq.bench.memory import weight_bytes
from ssmq.bench.models import prepare_for_inference, random_fp_model, random_quantized_model
from ssmq.bench.run import BenchSettings, compare_models
from ssmq.bench.shapes import shape_config
from ssmq.cli.main import cli
from ssmq.models.config import MambaConfig
from ssmq.ops.qtensor import QTensor

TINY = MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=128, d_state=8)


def test_real_shapes():
    cfg = shape_config("mamba-2.8b")
    assert (cfg.arch, cfg.d_model, cfg.n_layer, cfg.d_inner, cfg.vocab_size) == ("mamba1", 2560, 64, 5120, 50280)
    m2 = shape_config("mamba2-2.7b")
    assert (m2.arch, m2.d_model, m2.n_layer, m2.nheads, m2.ngroups, m2.d_state, m2.vocab_size) == (
        "mamba2", 2560, 64, 80, 1, 128, 50288)
    assert m2.in_proj_dim == 10576 and m2.tie_embeddings
    big = shape_config("mamba2-8b")
    assert (big.d_model, big.n_layer, big.ngroups, big.vocab_size, big.tie_embeddings) == (4096, 56, 8, 256000, False)
    big.n_layer = 1
    assert shape_config("mamba2-8b").n_layer == 56  # each call gives a fresh copy


def test_weight_bytes_count_tied_weights_once():
    fp = random_fp_model(TINY, "cpu")
    params = sum(p.numel() for p in fp.parameters())  # parameters() yields the tied weight once
    assert weight_bytes(fp) == 2 * params
    q = random_quantized_model(TINY, "cpu")
    assert weight_bytes(q) < weight_bytes(fp)


def test_int8_head_shares_one_table():
    q = random_quantized_model(TINY, "cpu", quantize_embedding=True, quantize_lm_head=True)
    assert q.lm_head.weight is q.backbone.embeddings.weight
    assert q.lm_head.weight_scale is q.backbone.embeddings.weight_scale
    assert weight_bytes(q) < weight_bytes(random_quantized_model(TINY, "cpu"))


def test_static_cache_keeps_storage_and_continues_exactly():
    q = prepare_for_inference(random_quantized_model(TINY, "cpu"))
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_cache, cache = q.new_cache(), static_cache(TINY.n_layer)
        q(ids[:, :5], ref_cache)
        q(ids[:, :5], cache)
        conv_ptr, ssm_ptr = cache.conv[0].data_ptr(), cache.ssm[0].codes.data_ptr()
        ref = q(ids[:, 5:], ref_cache)
        out = q(ids[:, 5:], cache)
    assert torch.equal(out, ref)
    assert cache.conv[0].data_ptr() == conv_ptr and cache.ssm[0].codes.data_ptr() == ssm_ptr
    assert isinstance(cache.ssm[0], QTensor) and torch.equal(cache.ssm[0].codes, ref_cache.ssm[0].codes)


def test_compare_reports_both_models_and_ratios():
    fp = prepare_for_inference(random_fp_model(TINY, "cpu", dtype=torch.float32))
    q = prepare_for_inference(random_quantized_model(TINY, "cpu"))
    result = compare_models(fp, {"w8a8": q}, BenchSettings(prompt_len=4, gen_len=2, batches=(1,), repeats=1,
                                                              transformers=False))
    row = result.rows[0]
    assert row["fp16"]["ttft_ms"] > 0 and row["w8a8"]["tpot_ms"] > 0
    assert 0 < row["ratios"]["w8a8"]["weight_fraction"] < 1
    assert result.environment["device"] == "cpu"


def test_cli_bench_json(tmp_path):
    model_dir = ssmq.save(ssmq.build_model(TINY, seed=1), tmp_path / "tiny")
    res = CliRunner().invoke(cli, ["bench", str(model_dir), "--prompt-len", "4", "--gen-len", "2", "--batch", "1",
                                   "--repeats", "1", "--device", "cpu", "--no-transformers", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    row = out["rows"][0]
    assert out["models"] == ["quamba1"]  # Mamba1's default twin
    assert row["batch"] == 1 and row["quamba1"]["tpot_ms"] > 0 and "tpot_speedup" in row["ratios"]["quamba1"]


def test_cli_bench_needs_model_or_shape():
    res = CliRunner().invoke(cli, ["bench", "--device", "cpu"])
    assert res.exit_code == 2 and "either MODEL_OR_QMODEL or --shape" in res.output
