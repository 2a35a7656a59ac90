"""Real Mamba1 and Mamba2 model shapes for benchmarks with random weights (timing does not depend on the values).

Mamba1 (state-spaces/mamba-*): d_state 16, d_conv 4, expand 2, tied embeddings, the GPT-NeoX vocabulary padded
to a multiple of 8. Mamba2 (state-spaces/mamba2-*): d_state 128, headdim 64, ngroups 1, expand 2, d_conv 4,
chunk_size 256, tied embeddings, the GPT-NeoX vocabulary padded to a multiple of 16. mamba2-8b is NVIDIA's
mamba2-8b-3t-4k as Quamba's conversion to the mamba_ssm layout describes it (convert_mamba2_8b_to_hf.py):
56 layers of d_model 4096, ngroups 8, chunk_size 128, a 256000-token vocabulary and an untied lm_head.
"""

from __future__ import annotations

import dataclasses

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig

VOCAB = 50280  # Mamba1: the GPT-NeoX vocabulary padded to a multiple of 8, as in the released checkpoints
MAMBA2_VOCAB = 50288  # Mamba2: the same vocabulary (50277) padded to a multiple of 16


def _mamba1(d_model: int, n_layer: int) -> MambaConfig:
    return MambaConfig(arch="mamba1", d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)


def _mamba2(d_model: int, n_layer: int) -> MambaConfig:
    return MambaConfig(arch="mamba2", d_model=d_model, n_layer=n_layer, vocab_size=MAMBA2_VOCAB, d_state=128,
                       headdim=64, ngroups=1, expand=2, d_conv=4, chunk_size=256, tie_embeddings=True)


SHAPES: dict[str, MambaConfig] = {
    "mamba-130m": _mamba1(768, 24),
    "mamba-370m": _mamba1(1024, 48),
    "mamba-790m": _mamba1(1536, 48),
    "mamba-1.4b": _mamba1(2048, 48),
    "mamba-2.8b": _mamba1(2560, 64),
    "mamba2-130m": _mamba2(768, 24),
    "mamba2-370m": _mamba2(1024, 48),
    "mamba2-780m": _mamba2(1536, 48),
    "mamba2-1.3b": _mamba2(2048, 48),
    "mamba2-2.7b": _mamba2(2560, 64),
    "mamba2-8b": MambaConfig(arch="mamba2", d_model=4096, n_layer=56, vocab_size=256000, d_state=128, headdim=64,
                             ngroups=8, expand=2, d_conv=4, chunk_size=128, tie_embeddings=False),
}


def shape_config(name: str) -> MambaConfig:
    """The MambaConfig of a named shape (a fresh copy: callers may modify it)."""
    try:
        return dataclasses.replace(SHAPES[name])
    except KeyError:
        raise SsmqError(f"unknown shape {name!r}; available: {', '.join(SHAPES)}") from None
