"""The decoding cache: per layer, the conv state (last k-1 conv inputs) and the SSM state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ssmq.ops.qtensor import QTensor


@dataclass
class MambaCache:
    """States carried between forward calls. A fresh cache (all None) starts a sequence from zeros;
    each mixer replaces its entries after every call, so prefill then one-token steps continue exactly."""

    conv: list[torch.Tensor | None] = field(default_factory=list)
    ssm: list[torch.Tensor | QTensor | None] = field(default_factory=list)
    seqlen: int = 0

    @classmethod
    def empty(cls, n_layer: int) -> MambaCache:
        return cls(conv=[None] * n_layer, ssm=[None] * n_layer)

    def nbytes(self) -> int:
        """Bytes held by all states (int8 codes and their scales included)."""
        tensors = []
        for state in self.conv + self.ssm:
            if isinstance(state, QTensor):
                tensors += [state.codes, state.scale]
            elif state is not None:
                tensors.append(state)
        return sum(t.numel() * t.element_size() for t in tensors)
