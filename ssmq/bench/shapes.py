"""Real Mamba1 model shapes for benchmarks with random weights (timing does not depend on the values)."""

from __future__ import annotations

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig

VOCAB = 50280  # the GPT-NeoX vocabulary padded to a multiple of 8, as in the released checkpoints

SHAPES: dict[str, tuple[int, int]] = {  # name -> (d_model, n_layer)
    "mamba-130m": (768, 24),
    "mamba-370m": (1024, 48),
    "mamba-790m": (1536, 48),
    "mamba-1.4b": (2048, 48),
    "mamba-2.8b": (2560, 64),
}


def shape_config(name: str) -> MambaConfig:
    """The MambaConfig of a named shape (d_state 16, d_conv 4, expand 2, tied embeddings)."""
    try:
        d_model, n_layer = SHAPES[name]
    except KeyError:
        raise SsmqError(f"unknown shape {name!r}; available: {', '.join(SHAPES)}") from None
    return MambaConfig(arch="mamba1", d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
