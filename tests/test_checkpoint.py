"""Loading both checkpoint layouts, saving, and the errors for bad model directories."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssmq
from ssmq.errors import CheckpointError, ConfigError
from ssmq.models.checkpoint import state_dict_sha256

from conftest import NEOX_TOKENIZER, random_ids, tiny_config


@torch.no_grad()
def test_save_load_round_trip_is_exact(tiny_model_dir, arch):
    model, tok = ssmq.load(tiny_model_dir)
    assert tok is None
    ids = random_ids(128, (1, 9))
    again = ssmq.save(model, tiny_model_dir.parent / "again")
    model2, _ = ssmq.load(again)
    assert torch.equal(model(ids), model2(ids))
    assert state_dict_sha256(model) == state_dict_sha256(model2)
    assert json.loads((again / "config.json").read_text())["model_type"] == ("mamba" if arch == "mamba1" else "mamba2")


def _mamba_ssm_dir(tmp_path, arch, model):
    """Write `model` the way mamba_ssm does: d_model/n_layer config, pytorch_model.bin, embedding key."""
    cfg = model.config
    ssm_cfg = {"d_state": cfg.d_state} if arch == "mamba1" else {
        "layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.headdim, "ngroups": cfg.ngroups,
        "chunk_size": cfg.chunk_size}
    raw = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": 120, "ssm_cfg": ssm_cfg,
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
           "tie_embeddings": True}
    d = tmp_path / "mamba_ssm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    state = {k.replace("embeddings", "embedding"): v.clone() for k, v in model.state_dict().items()}
    torch.save(state, d / "pytorch_model.bin")
    return d


@torch.no_grad()
def test_mamba_ssm_layout_pads_vocab_and_ties_head(tmp_path, arch):
    model = ssmq.build_model(tiny_config(arch, vocab_size=128, tie_embeddings=True), seed=5)
    loaded, _ = ssmq.load(_mamba_ssm_dir(tmp_path, arch, model))
    assert loaded.config.vocab_size == 128  # 120 padded to a multiple of 16
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embeddings.weight.data_ptr()
    ids = random_ids(120, (2, 7))
    assert torch.equal(model(ids), loaded(ids))


@torch.no_grad()
def test_sharded_safetensors(tmp_path, tiny_model_dir):
    state = load_file(tiny_model_dir / "model.safetensors")
    keys = sorted(state)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in halves.items():
        save_file({k: state[k] for k in names}, d / shard)
    index = {"weight_map": {k: shard for shard, names in halves.items() for k in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, _ = ssmq.load(tiny_model_dir)
    b, _ = ssmq.load(d)
    ids = random_ids(128, (1, 5))
    assert torch.equal(a(ids), b(ids))


def _rewrite(model_dir, mutate):
    state = load_file(model_dir / "model.safetensors")
    mutate(state)
    save_file(state, model_dir / "model.safetensors")


def test_missing_extra_and_misshaped_tensors_are_named(tiny_model_dir):
    key = "backbone.layers.1.mixer.out_proj.weight"
    original = load_file(tiny_model_dir / "model.safetensors")
    _rewrite(tiny_model_dir, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensor '{key}'"):
        ssmq.load(tiny_model_dir)
    save_file({**original, "backbone.layers.9.bogus": torch.zeros(1)}, tiny_model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'backbone.layers.9.bogus'"):
        ssmq.load(tiny_model_dir)
    bad = dict(original)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, tiny_model_dir / "model.safetensors")
    shape = tuple(original[key].shape)
    with pytest.raises(CheckpointError, match=re.escape(f"'{key}' has shape (3, 3), expected {shape}")):
        ssmq.load(tiny_model_dir)


def test_truncated_weights_and_bad_configs(tiny_model_dir, tmp_path):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ssmq.load(tiny_model_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="not a model directory"):
        ssmq.load(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable config"):
        ssmq.load(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        ssmq.load(empty)
    (empty / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 8,
                                                   "ssm_cfg": {"layer": "Mamba3"}}))
    with pytest.raises(ConfigError, match="Mamba3"):
        ssmq.load(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="missing required key 'num_hidden_layers'"):
        ssmq.load(empty)


def test_tokenizer_must_fit_the_embedding(tiny_model_dir):
    with pytest.raises(CheckpointError, match="tokenizer has 50277 ids but the model's embedding has only 128"):
        ssmq.load(tiny_model_dir, tokenizer=NEOX_TOKENIZER)


def test_transformers_config_time_step_rank_auto(tmp_path):
    from ssmq.models.config import parse_config
    cfg = parse_config({"model_type": "mamba", "hidden_size": 80, "num_hidden_layers": 2, "vocab_size": 10,
                        "time_step_rank": "auto"})
    assert cfg.dt_rank == 5  # ceil(80 / 16)
