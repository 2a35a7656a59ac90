"""Shared test helpers: tiny models written to temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ssmq
from ssmq.models.config import MambaConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEOX_TOKENIZER = SHARED_DATA / "gpt-neox-20b-tokenizer.json"

TINY = {
    "mamba1": dict(arch="mamba1", d_model=32, n_layer=2, vocab_size=128, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=32, n_layer=2, vocab_size=128, d_state=8, headdim=8, ngroups=2,
                   chunk_size=8),
}


def tiny_config(arch: str, **overrides) -> MambaConfig:
    return MambaConfig(**{**TINY[arch], **overrides})


@pytest.fixture(params=["mamba1", "mamba2"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path, arch) -> Path:
    """A saved random tiny model of each architecture (no tokenizer)."""
    model = ssmq.build_model(tiny_config(arch), seed=3)
    return ssmq.save(model, tmp_path / f"tiny-{arch}")


def random_ids(vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def distinct_segment_scales(qm) -> None:
    """Give each in_proj output segment (z, x, B, C, dt) and each conv.x group of a quantized Mamba2 its own
    scale, so that a scale read for the wrong channels changes the result."""
    g = torch.Generator().manual_seed(8)
    for name in qm.scales.names():
        if ".in_proj." in name or name.endswith(".conv.x"):
            qm.scales.set(name, qm.scales[name] * (0.5 + torch.rand(qm.scales[name].shape, generator=g)))
