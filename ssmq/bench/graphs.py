"""CUDA-graph decoding: a decode cache with fixed storage, and one captured decoding step per batch size.

A graph replays fixed device addresses, but the mixers *replace* their cache entries after each call.
`static_cache` keeps the replacement semantics and fixes the storage: assigning a new state copies it
into the tensor already there (the first assignment, usually the prefill's, allocates it). Those tensors
are marked with ssmq.ops.dispatch.mark_static_state, so the one-token kernels update them in place and
the copy does nothing; with ops that return new tensors it is one small copy per state.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmq.models.cache import MambaCache
from ssmq.models.lm import MambaLM
from ssmq.ops.dispatch import mark_static_state
from ssmq.ops.qtensor import QTensor

State = torch.Tensor | QTensor | None


def _owned(value: State) -> State:
    """A fresh, contiguous, marked copy of a state (a QTensor keeps its scale tensor)."""
    if value is None:
        return None
    if isinstance(value, QTensor):
        return QTensor(mark_static_state(value.codes.contiguous().clone()), value.scale)
    return mark_static_state(value.contiguous().clone())


class StaticSlots(list):
    """Per-layer states whose storage never moves: `slots[i] = new` copies new into slots[i]."""

    def __setitem__(self, index: Any, value: State) -> None:  # type: ignore[override]
        old = list.__getitem__(self, index)
        if old is None or value is None or type(old) is not type(value):
            list.__setitem__(self, index, _owned(value))
        elif isinstance(old, QTensor):
            if value.codes is not old.codes:
                old.codes.copy_(value.codes)
            if value.scale is not old.scale:
                list.__setitem__(self, index, QTensor(old.codes, value.scale))
        elif value is not old:
            old.copy_(value)


def static_cache(n_layer: int) -> MambaCache:
    """An empty decode cache with fixed-storage states (see the module docstring)."""
    return MambaCache(conv=StaticSlots([None] * n_layer), ssm=StaticSlots([None] * n_layer))


def _states(cache: MambaCache) -> list[torch.Tensor]:
    return [s.codes if isinstance(s, QTensor) else s for s in list(cache.conv) + list(cache.ssm) if s is not None]


class GraphDecoder:
    """Greedy decoding steps of `model` replayed from one CUDA graph (batch size fixed at capture).

    The cache must be a `static_cache` that a prefill has filled. Capturing runs two eager warm-up steps
    (kernel compilation, scale validation) whose effect on the cache is undone. Each `step()` feeds the
    previous step's argmax token (or `ids` when given) and returns the step's logits (batch, 1, vocab),
    a buffer that the next step overwrites.
    """

    def __init__(self, model: MambaLM, cache: MambaCache, first_ids: torch.Tensor):
        if not isinstance(cache.conv, StaticSlots) or any(s is None for s in cache.conv):
            raise ValueError("GraphDecoder needs a static_cache filled by a prefill")
        self.model, self.cache = model, cache
        self.ids = first_ids.detach().clone().reshape(-1, 1)
        saved = [s.clone() for s in _states(cache)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                model(self.ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = model(self.ids, cache)
            self.ids.copy_(self.logits[:, -1].argmax(-1, keepdim=True))
        for state, value in zip(_states(cache), saved):
            state.copy_(value)
        cache.seqlen -= 3
        self.ids.copy_(first_ids.reshape(-1, 1))

    def step(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step (replay); `ids` (batch,) or (batch, 1) overrides the fed-back tokens."""
        if ids is not None:
            self.ids.copy_(ids.reshape(-1, 1))
        self.graph.replay()
        self.cache.seqlen += 1
        return self.logits
