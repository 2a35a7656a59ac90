"""Logits parity with transformers' MambaForCausalLM / Mamba2ForCausalLM, an independent implementation,
loaded from the very files ssmq writes (fp32, relative error <= 1e-5)."""

import pytest
import torch

import ssmq

from conftest import random_ids

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

SHAPES = {
    "mamba1-130m-shape": dict(arch="mamba1", d_model=768, n_layer=24, vocab_size=50280),
    "mamba1-bias-untied": dict(arch="mamba1", d_model=48, n_layer=3, vocab_size=96, d_state=4, dt_rank=6,
                               proj_bias=True, conv_bias=False, tie_embeddings=False, d_conv=3),
    "mamba2-multigroup": dict(arch="mamba2", d_model=64, n_layer=3, vocab_size=96, d_state=16, headdim=16,
                              ngroups=4, chunk_size=8, dt_limit=(0.002, 0.5), tie_embeddings=False),
    "mamba2-two-groups": dict(arch="mamba2", d_model=128, n_layer=4, vocab_size=256, d_state=32, headdim=32,
                              ngroups=2, chunk_size=16),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(SHAPES))
@torch.no_grad()
def test_logits_match_transformers(tmp_path, name):
    spec = SHAPES[name]
    model = ssmq.build_model(ssmq.MambaConfig(**spec), seed=11)
    directory = ssmq.save(model, tmp_path / name)
    cls = transformers.MambaForCausalLM if spec["arch"] == "mamba1" else transformers.Mamba2ForCausalLM
    reference = cls.from_pretrained(directory, dtype=torch.float32).eval()
    ids = random_ids(spec["vocab_size"], (2, 40 if spec["d_model"] < 768 else 12), seed=4)
    ours = model(ids)
    theirs = reference(ids).logits
    assert relative_error(ours, theirs) <= 1e-5
