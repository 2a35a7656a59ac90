"""Triton kernels (GPU) for the ssmq ops: fast versions that must reproduce the reference ops.

Triton is optional: `HAS_TRITON` says whether it can be imported. The kernel modules import it at
their top, so import them only when it is available (ssmq.ops.dispatch does, lazily, on the first
CUDA call). Each module's launchers take the same tensors as the reference op they mirror; they run on
whatever device Triton targets (a GPU, or the CPU under `TRITON_INTERPRET=1` in tests).
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
