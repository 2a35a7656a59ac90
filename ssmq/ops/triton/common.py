"""Helpers shared by the Triton kernels: the int8 rounding rule, activations, launch arithmetic.

`quantize_rn` restates ssmq.ops.quantize's rule in Triton: a correctly rounded division
(`tl.div_rn`, not a multiply by the reciprocal), NaN -> 0, saturation to [-128, 127], then round half
to even. Rounding uses the fp32 magic-number identity rint(v) = (v + 1.5 * 2^23) - 1.5 * 2^23, exact
for |v| < 2^22 (v is clamped first, which commutes with rounding here); unlike libdevice's rint it
also runs under the Triton interpreter.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23


@triton.jit
def quantize_rn(x, scale):
    """int8 codes clamp(round_half_even(x / scale), -128, 127) of fp32 x (NaN -> 0, +-inf saturate)."""
    v = tl.div_rn(x, scale)
    v = tl.where(v == v, v, 0.0)
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return v.to(tl.int8)


@triton.jit
def silu(x):
    """x * sigmoid(x) in fp32, written as torch computes it: x / (1 + exp(-x))."""
    return x / (1.0 + tl.exp(-x))


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20): x above 20, else log(1 + exp(x))."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def flat_scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A scale as a contiguous 1-D fp32 tensor on `device` (one entry, or one per channel). Kernels read
    scales through pointers, so a captured CUDA graph sees later in-place edits. Validity is the
    caller's business (ssmq.ops.dispatch checks every scale)."""
    return torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1).contiguous()


PER_TENSOR, PER_CHANNEL, PER_ROW = 0, 1, 2


def scale_mode(scale: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> int | None:
    """How a scale broadcasts against a tensor of `shape` (..., C): PER_TENSOR (one entry), PER_CHANNEL
    (C entries over the last dim), PER_ROW ((..., 1), one per row), or None for layouts the kernels
    don't take (the caller falls back to the reference op)."""
    channels = shape[-1] if len(shape) else 1
    if scale.numel() == 1:
        return PER_TENSOR
    if scale.numel() == channels and scale.shape[-1] == channels and scale.dim() <= len(shape):
        return PER_CHANNEL
    if (scale.dim() == len(shape) and scale.shape[-1] == 1
            and tuple(scale.shape[:-1]) == tuple(shape[:-1])):
        return PER_ROW
    return None


@triton.jit
def load_scale(s_ptr, MODE: tl.constexpr, row, col, mask):
    """The scale for elements at (row, col) (broadcast tensors of indices), per MODE of scale_mode."""
    if MODE == 0:
        return tl.load(s_ptr)
    elif MODE == 1:
        return tl.load(s_ptr + (col + row * 0), mask=mask, other=1.0)
    else:
        return tl.load(s_ptr + (row + col * 0), mask=mask, other=1.0)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton runs kernels in its interpreter (set before triton is imported, ssmq.ops.triton.interpreter):
it runs no inline PTX, so kernels that use some define an equivalent in plain operations for it."""

USE_PDL = True
"""Whether kernels on Hopper and newer GPUs launch with PDL (pdl_options); benchmarks turn it off to
measure what it gains."""

PREFETCH_L2 = True
"""Whether the norm kernels (residual add + RMSNorm, gated RMSNorm, Hadamard rotation) prefetch their
weights and matrices into L2 before their PDL wait (prefetch_options, prefetch_span); benchmarks turn it
off to measure what it gains. gpu_check's ab stage on an H200 (mamba2-8b quamba2-w4a8, CUDA-graph
decoding) timed 2.264 ms per token with these prefetches, 2.29 with none; prefetching the GEMVs' weight
rows (2.32), the conv and SSD steps' states (2.35) or all three families (2.36) was slower, and is not done
(docs/performance.md)."""


@lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


WEIGHT_EVICTION = "evict_first"
"""The L2 eviction policy of the W4A8 decoding GEMV's weight loads (Triton's `eviction_policy`:
"evict_first", "evict_last" or "" for the default): the weights stream through L2 once per token, and
marked first to go they leave the small operands of the other kernels (norm weights, scales, conv
states, the Hadamard matrices) in L2 from one token to the next. gpu_check's ab stage on an H200,
mamba2-8b quamba2-w4a8: 2.179 ms per token against 2.190 without (twice each, in one process). The W8A8
GEMV keeps the default: a bench with the hint there too timed quamba2-w8a8 at 3.078 ms against 3.02."""


PRELOAD_WEIGHTS = True
"""Whether the int8 (W8A8) and W4A8 dp4a GEMVs of a model's linears load their first step's weights before
their PDL wait (the kernels' PRELOAD; dispatch's constant_weights), so that the weights stream in while the
kernel before (a norm, the Hadamard rotation, the SSD step) still runs: a model's weights are written only
between forwards, so they may be read before the wait. gpu_check's ab stage on an H200 (CUDA-graph
decoding, ms per token, without -> with): mamba2-8b quamba2-w4a8 2.219 -> 2.127; mamba2-2.7b quamba2-w4a8
1.850 -> 1.677, quamba2-w8a8 2.244 -> 2.165."""


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Launch options for programmatic dependent launch (PDL): on Hopper and newer GPUs a kernel may be
    launched, and run its prologue, while the kernel before it finishes; it waits (wait_for_inputs)
    before it reads or writes any tensor (before the wait, the previous kernel's writes may not be
    visible, and a weight may have just been computed by it); only L2 prefetches (prefetch_options)
    and the loads of a model's constant weights (PRELOAD_WEIGHTS) come earlier. Off under the interpreter
    and on older GPUs."""
    on = (USE_PDL and device.type == "cuda" and not INTERPRETED
          and _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": on, "launch_pdl": on}


def prefetch_options(device: torch.device) -> dict[str, bool]:
    """pdl_options and PREFETCH: whether a kernel prefetches its weights into L2 before its wait (with PDL
    and PREFETCH_L2)."""
    options = pdl_options(device)
    return {**options, "PREFETCH": options["PDL"] and PREFETCH_L2}


def span_lines(nbytes: int) -> int:
    """prefetch_span's LINES for a span of up to nbytes bytes at any alignment: a power of two covering the
    cdiv(nbytes, 128) + 1 lines it may touch."""
    return next_pow2(-(-max(nbytes, 1) // 128) + 1)


@triton.jit
def prefetch_span(ptr, nbytes, LINES: tl.constexpr):
    """Ask for the 128-byte lines of the nbytes (> 0) bytes from ptr to be brought into L2 (an address in
    each line they touch: LINES of them, span_lines; the spare ones repeat the last byte). No value and no
    effect on any result, so a kernel may do it before it waits (wait_for_inputs), for operands that the
    kernel before does not write: in a decoding step their lines were evicted from L2 by the other layers'
    weights since their last use, and their DRAM latency then passes while the kernel before finishes."""
    offs = tl.minimum(tl.arange(0, LINES) * 128, nbytes - 1)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptr.to(tl.pointer_type(tl.int8)) + offs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr, LET_NEXT_START: tl.constexpr = True):
    """With PDL: wait until the kernel before this one has finished and its writes are visible (every
    load and store comes after this, but the GEMVs' loads of constant weights, PRELOAD_WEIGHTS), then
    (LET_NEXT_START) let the next kernel start launching. Every kernel launched with PDL calls it on all
    paths, so the waits chain: kernel k + 2 waits for k. A kernel of several waves of programs passes
    LET_NEXT_START=False and calls let_next_start after its main loop, so that the next kernel's waiting
    programs do not take the SM slots its later waves need."""
    if PDL:
        gdc_wait()
        if LET_NEXT_START:
            gdc_launch_dependents()


@triton.jit
def let_next_start(PDL: tl.constexpr):
    """With PDL: the next kernel may start launching (see wait_for_inputs)."""
    if PDL:
        gdc_launch_dependents()
