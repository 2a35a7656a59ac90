"""Conv1d (+SiLU, +quantize) and add+RMSNorm (+quantize) kernels against the reference ops, on the CPU
through Triton's interpreter."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.ops import conv, int8_conv, int8_norm, norm  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton import conv as tconv  # noqa: E402
from ssmq.ops.triton import norm as tnorm  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

B, C, K = 2, 12, 4


def inputs(length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, length, 2 * C, generator=g)[..., :C]  # a strided view, as in_proj's x half
    return x, torch.randn(C, K, generator=g), torch.randn(C, generator=g), torch.randn(B, K - 1, C, generator=g)


@pytest.mark.parametrize("length", [19, 2, 1])
@pytest.mark.parametrize("with_state", [False, True])
def test_float_conv(length, with_state):
    x, w, bias, state = inputs(length)
    state = state if with_state else None
    out, new_state = tconv.conv1d(x, w, bias, state, tconv.OUT_PRE)
    ref, ref_state = conv.causal_conv1d(x, w, bias, state)
    assert agreement(out, ref).rel_error < 1e-6
    assert torch.equal(new_state, ref_state)
    fused, _ = tconv.conv1d(x.half(), w.half(), bias, None if state is None else state.half(), tconv.OUT_SILU)
    pre, _ = conv.causal_conv1d(x.half(), w.half(), bias, None if state is None else state.half())
    assert fused.dtype == torch.float16 and agreement(fused, torch.nn.functional.silu(pre).half()).ok


@pytest.mark.parametrize("length", [19, 1])
@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_conv_silu_quantize(length, per_channel):
    x, w, bias, state = inputs(length, seed=1)
    g = torch.Generator().manual_seed(2)
    xs = torch.tensor(0.03)
    ws = torch.rand(C, generator=g) * 0.01 + 1e-3 if per_channel else torch.tensor(0.01)
    xq, wq, sq = quantize(x, xs), quantize(w, ws.reshape(-1, 1)), quantize(state, xs)
    for st in (None, sq):
        pre, ns = tconv.conv1d(xq, wq, bias, st, tconv.OUT_PRE, xs, ws)
        ref_pre, ref_ns = int8_conv.int8_causal_conv1d(xq, xs, wq, ws, bias, st)
        assert torch.equal(pre, ref_pre) and torch.equal(ns, ref_ns)
        codes, _ = tconv.conv1d(xq, wq, bias, st, tconv.OUT_Q8, xs, ws, torch.tensor(0.02))
        ref_codes, _ = int8_conv.int8_causal_conv1d_silu(xq, xs, wq, ws, bias, torch.tensor(0.02), st)
        assert agreement(codes, ref_codes).ok


def test_conv_step_updates_state_in_place():
    x, w, bias, state = inputs(1, seed=3)
    xs, ws, os_ = torch.tensor(0.03), torch.tensor(0.01), torch.tensor(0.02)
    xq, wq, sq = quantize(x, xs), quantize(w, ws), quantize(state, xs)
    ref_codes, ref_state = int8_conv.int8_causal_conv1d_silu(xq, xs, wq, ws, bias, os_, sq)
    slot = sq.clone()
    codes, new_state = tconv.conv1d(xq, wq, bias, slot, tconv.OUT_Q8, xs, ws, os_, inplace=True)
    assert new_state.data_ptr() == slot.data_ptr() and torch.equal(slot, ref_state)
    assert agreement(codes, ref_codes).ok


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_int8_add_rms_norm(with_residual, residual_in_fp32):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 3, 40, generator=g).half()
    residual = torch.randn(2, 3, 40, generator=g) if with_residual else None
    weight = torch.rand(40, generator=g) + 0.5
    for scale in (torch.tensor(0.02), torch.rand(40, generator=g) * 0.02 + 0.01):
        codes, stored = tnorm.int8_add_rms_norm(hidden, residual, weight, 1e-5, scale, residual_in_fp32)
        ref_codes, ref_stored = int8_norm.int8_add_rms_norm(hidden, residual, weight, 1e-5, scale, residual_in_fp32)
        assert agreement(codes, ref_codes).ok
        assert stored.dtype == ref_stored.dtype and torch.equal(stored, ref_stored)


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
def test_rms_norm(weight_dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=g)
    weight = (torch.rand(40, generator=g) + 0.5).to(weight_dtype)
    out = tnorm.rms_norm(x, weight, 1e-5)
    ref = norm.rms_norm(x, weight, 1e-5)
    assert out.dtype == ref.dtype and agreement(out, ref).rel_error < 1e-6
    normed, stored = tnorm.add_rms_norm(x.half(), x, weight, 1e-5)
    assert torch.equal(stored, x + x.half().float())
    assert agreement(normed, norm.rms_norm(stored, weight, 1e-5)).rel_error < 1e-6


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("width,group", [(64, 64), (80, 20), (96, 24)])
def test_gated_rms_norm(weight_dtype, width, group):
    """Mamba2's gated norm: one group per row (ngroups 1) and several; non-power-of-two groups; the gate a
    strided slice (z of in_proj's output); fp16 and fp32 inputs and weights."""
    g = torch.Generator().manual_seed(width + group)
    zx = torch.randn(3, 5, 2 * width, generator=g) * 2
    gate, y = zx[..., :width], torch.randn(3, 5, width, generator=g)
    weight = (torch.rand(width, generator=g) + 0.5).to(weight_dtype)
    for dtype in (torch.float16, torch.float32):
        out = tnorm.gated_rms_norm(y.to(dtype), gate.to(dtype), weight, 1e-5, group)
        ref = norm.gated_rms_norm(y.to(dtype), gate.to(dtype), weight, 1e-5, group)
        assert out.dtype == ref.dtype == weight_dtype
        # fp32: exp and rsqrt approximations only; fp16 weights: a few elements round to the neighbouring
        # fp16 value (one ulp ~ 5e-4 relative)
        assert agreement(out, ref).rel_error < (2e-4 if weight_dtype == torch.float16 else 1e-5)
    assert tnorm.gated_rms_norm(y, gate, weight, 1e-5, width - 1) is None  # groups must divide the width


def test_gated_rms_norm_on_an_int8_gate():
    """Quantized z: codes * scale (one value or one per channel) inside the kernel, as dequantize + norm."""
    g = torch.Generator().manual_seed(7)
    y, codes = torch.randn(4, 48, generator=g), torch.randint(-127, 128, (4, 96), generator=g, dtype=torch.int8)
    gate, weight = codes[:, 48:], torch.rand(48, generator=g) + 0.5
    for scale in (torch.tensor(0.03), torch.rand(48, generator=g) * 0.05 + 0.01):
        out = tnorm.gated_rms_norm(y, gate, weight, 1e-5, 16, scale)
        assert agreement(out, norm.gated_rms_norm(y, gate.float() * scale, weight, 1e-5, 16)).rel_error < 1e-5
    assert tnorm.gated_rms_norm(y, gate, weight, 1e-5, 16, torch.rand(4, 48)) is None  # not a supported layout
