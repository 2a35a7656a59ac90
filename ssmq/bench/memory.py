"""Memory accounting: bytes of weights (each storage once, the scale book included) and of decode caches."""

from __future__ import annotations

import torch

from ssmq.models.cache import MambaCache
from ssmq.models.lm import MambaLM
from ssmq.quant.qmodel import QuantizedMambaLM


def weight_bytes(model: MambaLM) -> int:
    """Bytes of all parameters and buffers (tied weights counted once) plus a quantized model's scales."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    if isinstance(model, QuantizedMambaLM):
        tensors += [entry.value for _, entry in model.scales.items()]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def cache_bytes(cache: MambaCache) -> int:
    """Bytes of the decode states (int8 codes and their scales, or float states)."""
    return cache.nbytes()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes allocated on a CUDA device now (None elsewhere)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset_peak (None elsewhere)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
