"""Random quantized twins for `ssmq bench` (Mamba2 recipes, and the 4-bit ones on Mamba1): exactly the modules,
tensors and scales `ssmq quantize` produces, runnable on the reference and the kernel route with a static
decode cache, timed side by side with fp16, and the CLI's choice of recipes."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if HAS_TRITON:
    from ssmq.ops.triton.interpreter import use_interpreter

    use_interpreter()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import ssmq  # noqa: E402
from ssmq.bench.graphs import static_cache  # noqa: E402
from ssmq.bench.models import prepare_for_inference, random_fp_model, random_quantized_model  # noqa: E402
from ssmq.bench.run import BenchSettings, compare_models  # noqa: E402
from ssmq.cli.main import cli  # noqa: E402
from ssmq.errors import SsmqError  # noqa: E402
from ssmq.models.config import MambaConfig  # noqa: E402
from ssmq.ops import dispatch  # noqa: E402
from ssmq.ops.qtensor import QTensor  # noqa: E402
from ssmq.quant.quantize import quantize  # noqa: E402

from conftest import random_ids  # noqa: E402

# 2 SSD groups of 4 heads of 16 channels: quamba2's 4 x 4 head / channel groups divide them
M2 = MambaConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=4096, d_state=16, headdim=16, ngroups=2,
                 chunk_size=8)
M2_UNTIED = MambaConfig(**{**M2.to_dict(), "tie_embeddings": False})
M1 = MambaConfig(arch="mamba1", d_model=64, n_layer=2, vocab_size=4096, d_state=8)
TOKENIZER = Path(ssmq.__file__).parent / "fixtures" / "tiny-mamba1" / "tokenizer.json"  # 4096 ids
M2_RECIPES = ["quamba1", "quamba2-w8a8", "quamba2-w4a8", "quamba2-w4a16"]
CASES = ([(M2, r, head) for r in M2_RECIPES for head in (False, True)]
         + [(M2_UNTIED, "quamba2-w4a8", True), (M2_UNTIED, "quamba2-w8a8", True)]
         + [(M1, r, True) for r in ("quamba1", "quamba2-w4a8", "quamba2-w4a16")])


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(TOKENIZER))


def layout(qm):
    """Everything about a quantized model but its values: tensors, modules, scales."""
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in qm.state_dict().items()}
    modules = {n: type(m).__name__ for n, m in qm.named_modules()}
    scales = {n: (tuple(e.value.shape), e.value.dtype, e.observer, e.params) for n, e in qm.scales.items()}
    return tensors, modules, scales, qm.lm_head.weight is qm.backbone.embeddings.weight


@pytest.mark.parametrize("cfg,recipe,head", CASES)
def test_random_twin_has_the_layout_of_a_quantized_model(cfg, recipe, head, tokenizer):
    real = quantize(ssmq.build_model(cfg, seed=0), recipe, tokenizer=tokenizer, n=2, seqlen=16,
                    quantize_embedding=head, quantize_lm_head=head, progress=False)
    twin = random_quantized_model(cfg, "cpu", recipe, quantize_embedding=head, quantize_lm_head=head)
    assert layout(twin) == layout(real)
    assert twin.quant_config["transforms"] == real.quant_config["transforms"]
    assert twin.quant_config["plan"] == real.quant_config["plan"]


def test_grouped_scales_and_plausible_weights():
    twin = random_quantized_model(M2, "cpu", "quamba2-w8a8")
    assert twin.scales["layers.1.conv.x"].shape == (2, 4, 4) and twin.scales["layers.1.ssm.state"].shape == (2, 16)
    assert all(bool((e.value > 0).all()) for _, e in twin.scales.items())
    w4a8 = random_quantized_model(M2, "cpu", "quamba2-w4a8").backbone.layers[0].mixer.in_proj
    assert w4a8.weight.dtype == torch.uint8 and int(w4a8.weight.max()) > 200  # both nibbles random
    assert w4a8.group_scale.dtype == torch.int16 and 1 <= int(w4a8.group_scale.min()) <= int(w4a8.group_scale.max()) <= 127
    mixer = random_fp_model(M2, "cpu", dtype=torch.float32).backbone.layers[0].mixer
    assert bool((mixer.A_log > 0).all()) and bool((mixer.A_log < torch.log(torch.tensor(16.0))).all())
    assert bool((torch.nn.functional.softplus(mixer.dt_bias) < 0.11).all())  # dt in [dt_min, dt_max]


def test_recipes_that_do_not_apply_are_refused():
    with pytest.raises(SsmqError, match="quamba2-w8a8.*mamba2 models only"):
        random_quantized_model(M1, "cpu", "quamba2-w8a8")
    with pytest.raises(SsmqError, match="unknown recipe 'bogus'"):
        random_quantized_model(M2, "cpu", "bogus")


@torch.no_grad()
def decode(model, ids, cache, steps=2):
    """Logits of a prefill and `steps` greedy one-token steps, concatenated."""
    out = [model(ids, cache)[:, -1:]]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1), cache))
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("recipe", M2_RECIPES)
def test_random_twin_decodes_with_a_static_cache(recipe):
    model = prepare_for_inference(random_quantized_model(M2, "cpu", recipe, quantize_embedding=True,
                                                         quantize_lm_head=True))
    ids = random_ids(M2.vocab_size, (2, 6))
    ref = decode(model, ids, model.new_cache())
    cache = static_cache(M2.n_layer)
    with torch.no_grad():
        model(ids, cache)
    pointers = [t.codes.data_ptr() if isinstance(t, QTensor) else t.data_ptr() for t in cache.conv + cache.ssm]
    assert torch.isfinite(ref).all() and torch.equal(decode(model, ids, static_cache(M2.n_layer)), ref)
    decode(model, ids[:, -1:], cache)
    assert [t.codes.data_ptr() if isinstance(t, QTensor) else t.data_ptr() for t in cache.conv + cache.ssm] == pointers


def states(cache):
    return [t.codes if isinstance(t, QTensor) else t for t in cache.conv + cache.ssm]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("recipe", ["quamba2-w4a8", "quamba2-w4a16"])  # int8 and float states
def test_kernel_route_updates_the_static_cache_in_place(recipe, monkeypatch):
    """What a CUDA-graph step needs, on the (interpreted) kernels: a one-token step writes the new states
    into the static cache's tensors, and states and logits follow the reference route's."""
    from ssmq.ops.triton import linear, w4

    model = prepare_for_inference(random_quantized_model(M2, "cpu", recipe))
    ids = random_ids(M2.vocab_size, (1, 5))
    ref_cache = model.new_cache()
    ref = decode(model, ids, ref_cache, steps=1)
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    # few, wide GEMV programs: the interpreter runs programs one by one
    monkeypatch.setattr(linear, "_gemv_config", lambda n, k: dict(BLOCK_N=32, BLOCK_K=128, num_warps=4))
    gemv = w4._gemv_config
    monkeypatch.setattr(w4, "_gemv_config", lambda n, groups, hg: {**gemv(n, groups, hg), "BLOCK_N": 64})
    cache = static_cache(M2.n_layer)
    first = decode(model, ids, cache, steps=0)
    held = states(cache)
    with torch.no_grad():
        step = model(first[:, -1:].argmax(-1), cache).float()
    assert all(a is b for a, b in zip(states(cache), held))  # written in place
    for a, b in zip(held, states(ref_cache)):
        tol = 1 if a.dtype == torch.int8 else 1e-2 * float(b.abs().max())
        assert a.dtype == b.dtype and float((a.float() - b.float()).abs().max()) <= tol
    fast = torch.cat([first, step], 1)
    assert float((fast - ref).norm() / ref.norm()) < 2e-2


def test_random_twin_with_one_ssd_group_runs():
    cfg = MambaConfig(**{**M2.to_dict(), "ngroups": 1})
    model = random_quantized_model(cfg, "cpu", "quamba2-w8a8")
    assert torch.isfinite(decode(model, random_ids(cfg.vocab_size, (1, 4)), model.new_cache())).all()


def test_compare_models_reports_every_label_and_its_ratios():
    fp = prepare_for_inference(random_fp_model(M2, "cpu", dtype=torch.float32))
    twins = {r: prepare_for_inference(random_quantized_model(M2, "cpu", r)) for r in M2_RECIPES[1:]}
    result = compare_models(fp, twins, BenchSettings(prompt_len=4, gen_len=2, batches=(1, 2), repeats=1))
    assert result.labels == M2_RECIPES[1:] and [row["batch"] for row in result.rows] == [1, 2]
    for row in result.rows:
        assert set(row) == {"batch", "fp16", "ratios", *M2_RECIPES[1:]}  # transformers: Mamba1 only
        for label in M2_RECIPES[1:]:
            assert row[label]["model"] == label and row[label]["tpot_ms"] > 0
            assert 0 < row["ratios"][label]["weight_fraction"] < 1 and row["ratios"][label]["tpot_speedup"] > 0
    assert row["ratios"]["quamba2-w4a8"]["weight_fraction"] < row["ratios"]["quamba2-w8a8"]["weight_fraction"]
    with pytest.raises(ValueError, match="reserved"):
        compare_models(fp, {"fp16": fp}, BenchSettings(prompt_len=4, gen_len=2, batches=(1,), repeats=1))


def test_cli_bench_times_a_mamba2_model_against_each_recipe(tmp_path):
    model_dir = ssmq.save(ssmq.build_model(M2, seed=1), tmp_path / "m2")
    res = CliRunner().invoke(cli, ["bench", str(model_dir), "--recipes", "quamba2-w8a8,quamba2-w4a16",
                                   "--prompt-len", "4", "--gen-len", "2", "--batch", "1", "--repeats", "1",
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["models"] == ["quamba2-w8a8", "quamba2-w4a16"]
    assert set(out["rows"][0]["ratios"]) == {"quamba2-w8a8", "quamba2-w4a16"}
    table = CliRunner().invoke(cli, ["bench", str(model_dir), "--prompt-len", "4", "--gen-len", "2", "--batch", "1",
                                     "--repeats", "1", "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "ratio quamba2-w8a8" in table.output  # Mamba2's default twin


def test_cli_bench_refuses_bad_recipes_naming_them(tmp_path):
    for args, message in ((["--shape", "mamba2-2.7b", "--recipes", "bogus"], "unknown recipe 'bogus'"),
                          (["--shape", "mamba-130m", "--recipes", "quamba2-w8a8"], "'quamba2-w8a8' applies to mamba2"),
                          (["--shape", "mamba2-8b", "--recipes", "quamba2-w8a8,"], "got 'quamba2-w8a8,'")):
        res = CliRunner().invoke(cli, ["bench", *args, "--device", "cpu"])
        assert res.exit_code == 2 and message in res.output, res.output
    qdir = ssmq.save_quantized(random_quantized_model(M2, "cpu", "quamba2-w8a8"), tmp_path / "q")
    res = CliRunner().invoke(cli, ["bench", str(qdir), "--recipes", "quamba2-w4a8", "--device", "cpu"])
    assert res.exit_code == 2 and "--recipes applies to fp models" in res.output, res.output
