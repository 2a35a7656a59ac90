"""Wall-clock measurement of device work: CUDA events on a GPU, perf_counter (after a sync) elsewhere."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds that `fn` takes on `device`, from its first launch to the end of its last kernel."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median of `repeats` timings of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn, device) for _ in range(max(repeats, 1)))
