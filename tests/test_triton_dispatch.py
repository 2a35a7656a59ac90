"""ssmq.ops.dispatch: reference ops for CPU tensors; with the kernel route forced (the interpreter
stands in for the GPU), the same results as the reference through every dispatch function."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if HAS_TRITON:
    from ssmq.ops.triton.interpreter import use_interpreter

    use_interpreter()

import torch  # noqa: E402

from ssmq.errors import SsmqError  # noqa: E402
from ssmq.ops import dispatch  # noqa: E402
from ssmq.ops import (conv, hadamard, int8_conv, int8_embedding, int8_linear, int8_norm, int8_scan, norm,  # noqa: E402
                      scan)
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")


def i8(*shape, seed=0):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.fixture(params=["reference", "kernels"])
def route(request, monkeypatch):
    """Run each test on the CPU fallback, and again with dispatch forced onto the (interpreted) kernels."""
    if request.param == "kernels":
        if not HAS_TRITON:
            pytest.skip("Triton is not installed (pip install triton)")
        monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    return request.param


def test_scale_checked_once_per_version(monkeypatch):
    """A fresh view of a validated buffer is not checked again; an in-place edit is."""
    calls = []
    monkeypatch.setattr(dispatch, "check_scale", lambda s, name: calls.append(name) or s)
    buffer = torch.tensor([0.5, 0.25])
    for _ in range(3):
        dispatch._scale(buffer[0], "w_scale", buffer.device)
    assert calls == ["w_scale"]
    buffer.mul_(2)
    dispatch._scale(buffer[0], "w_scale", buffer.device)
    dispatch._scale(buffer, "w_scale", buffer.device)
    assert len(calls) == 3


def test_invalid_scale_edited_in_place_is_caught():
    buffer = torch.tensor([0.5])
    dispatch._scale(buffer[0], "w_scale", buffer.device)
    buffer.zero_()
    with pytest.raises(SsmqError, match="w_scale"):
        dispatch._scale(buffer[0], "w_scale", buffer.device)


def test_cpu_tensors_take_the_reference():
    assert not dispatch.uses_kernels(torch.zeros(2), None)
    assert not dispatch.uses_kernels(None)


def test_linear_and_quantize(route):
    x, w = i8(3, 40), i8(24, 40, seed=1)
    ws = torch.rand(24, generator=torch.Generator().manual_seed(2)) + 0.01
    out = dispatch.int8_linear(x, torch.tensor(0.01), w, ws, out_scale=torch.tensor(0.5))
    assert torch.equal(out, int8_linear.int8_linear(x, 0.01, w, ws, out_scale=0.5))
    v = torch.randn(4, 16)
    assert torch.equal(dispatch.quantize(v, torch.tensor(0.02)), quantize(v, 0.02))


def test_embedding(route):
    codes, scales = i8(10, 6), torch.rand(10) + 0.01
    ids = torch.tensor([[1, 9, 3]])
    assert torch.equal(dispatch.int8_embedding(ids, codes, scales), int8_embedding.int8_embedding(ids, codes, scales))


def test_int4_embedding(route):
    from ssmq.ops.int4 import int4_embedding, pack_int4, quantize_int4

    codes, scale = quantize_int4(torch.randn(10, 256, generator=torch.Generator().manual_seed(4)))
    ids = torch.tensor([[1, 9, 3]])
    out = dispatch.int4_embedding(ids, pack_int4(codes), scale)
    assert torch.equal(out, int4_embedding(ids, pack_int4(codes), scale))
    with pytest.raises(SsmqError, match="embedding row scales"):
        dispatch.int4_embedding(ids, pack_int4(codes), torch.zeros_like(scale))


def test_gated_norm(route):
    g = torch.Generator().manual_seed(5)
    y, z, w = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g), torch.rand(32, generator=g)
    out = dispatch.gated_rms_norm(y, z, w, 1e-5, 8)
    assert agreement(out, norm.gated_rms_norm(y, z, w, 1e-5, 8)).rel_error < 1e-6
    with pytest.raises(RuntimeError):  # groups that do not divide the width: the reference's error
        dispatch.gated_rms_norm(y, z, w, 1e-5, 5)
    codes = torch.randint(-127, 128, (2, 3, 32), generator=g, dtype=torch.int8)
    for scale in (torch.tensor(0.02), torch.rand(32, generator=g) * 0.05 + 0.01):
        out = dispatch.dequant_gated_rms_norm(y, codes, scale, w, 1e-5, 8)
        assert agreement(out, norm.gated_rms_norm(y, codes.float() * scale, w, 1e-5, 8)).rel_error < 1e-6
    with pytest.raises(SsmqError, match="gate scale"):
        dispatch.dequant_gated_rms_norm(y, codes, torch.tensor(-1.0), w, 1e-5, 8)


def test_every_scale_is_checked(route):
    with pytest.raises(SsmqError, match="x_scale"):
        dispatch.int8_linear(i8(2, 8), torch.tensor(0.0), i8(4, 8), torch.tensor(1.0))
    with pytest.raises(SsmqError, match="out_scale"):
        dispatch.int8_add_rms_norm(torch.randn(2, 8), None, torch.ones(8), 1e-5, torch.tensor(float("nan")))


def test_conv_norm_hadamard(route):
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 9, 16, generator=g), torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    out, state = dispatch.causal_conv1d(x, w, b)
    ref, ref_state = conv.causal_conv1d(x, w, b)
    assert agreement(out, ref).rel_error < 1e-6 and torch.equal(state, ref_state)
    fused, _ = dispatch.causal_conv1d_silu(x, w, b)
    assert agreement(fused, torch.nn.functional.silu(ref)).rel_error < 1e-6
    xq, wq = quantize(x, 0.03), quantize(w, 0.01)
    codes, st = dispatch.int8_causal_conv1d_silu(xq, torch.tensor(0.03), wq, torch.tensor(0.01), b,
                                                 torch.tensor(0.02))
    ref_codes, ref_st = int8_conv.int8_causal_conv1d_silu(xq, 0.03, wq, 0.01, b, 0.02)
    assert agreement(codes, ref_codes).ok and torch.equal(st, ref_st)
    pre, _ = dispatch.int8_causal_conv1d(xq, torch.tensor(0.03), wq, torch.tensor(0.01), b)
    assert torch.equal(pre, int8_conv.int8_causal_conv1d(xq, 0.03, wq, 0.01, b)[0])
    h, r, nw = torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g), torch.rand(32, generator=g)
    assert agreement(dispatch.rms_norm(h, nw, 1e-5), norm.rms_norm(h, nw, 1e-5)).rel_error < 1e-6
    normed, stored = dispatch.add_rms_norm(h, r, nw, 1e-5)
    assert torch.equal(stored, r + h) and agreement(normed, norm.rms_norm(r + h, nw, 1e-5)).rel_error < 1e-6
    codes, stored = dispatch.int8_add_rms_norm(h, r, nw, 1e-5, torch.tensor(0.05))
    ref_codes, ref_stored = int8_norm.int8_add_rms_norm(h, r, nw, 1e-5, 0.05)
    assert agreement(codes, ref_codes).ok and torch.equal(stored, ref_stored)
    y = torch.randn(3, 192, generator=g).half()
    assert agreement(dispatch.hadamard_transform(y), hadamard.hadamard_transform(y)).rel_error < 1e-6
    rotated = hadamard.hadamard_transform(y.float())
    assert agreement(dispatch.hadamard_quantize(y, torch.tensor(0.1)), quantize(rotated, 0.1)).ok
    assert torch.equal(dispatch.hadamard_quantize(y, torch.tensor(0.1), rotate=False), quantize(y, 0.1))


def test_scans(route):
    g = torch.Generator().manual_seed(4)
    b, length, d, n = 1, 5, 8, 4
    u, delta, z = (torch.randn(b, length, d, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g)
    Bm, Cm = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    y, h = dispatch.selective_scan(u, delta, A, Bm, Cm, D, z, bias)
    ref_y, ref_h = scan.selective_scan(u, delta, A, Bm, Cm, D, z, bias)
    assert agreement(y, ref_y).rel_error < 1e-5 and agreement(h, ref_h).rel_error < 1e-5
    s = torch.tensor(0.03)
    q = [quantize(t, s) for t in (u, delta, Bm, Cm, z)]
    y, h = dispatch.int8_selective_scan(q[0], s, q[1], s, A, q[2], s, q[3], s, s, D=D, z_q=q[4], z_scale=s,
                                        delta_bias=bias)
    ref_y, ref_h = int8_scan.int8_selective_scan(q[0], s, q[1], s, A, q[2], s, q[3], s, s, D=D, z_q=q[4],
                                                 z_scale=s, delta_bias=bias)
    assert agreement(y, ref_y).ok and agreement(h, ref_h).ok


@needs_triton
def test_static_states_are_updated_in_place(monkeypatch):
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 1, 16, generator=g), torch.randn(16, 4, generator=g)
    slot = dispatch.mark_static_state(torch.randn(2, 3, 16, generator=g))
    expected = conv.causal_conv1d(x, w, None, slot.clone())[1]
    _, state = dispatch.causal_conv1d(x, w, None, slot)
    assert state is slot and torch.equal(slot, expected)
    plain = torch.randn(2, 3, 16, generator=g)
    _, state = dispatch.causal_conv1d(x, w, None, plain)
    assert state is not plain


@needs_triton
def test_programmatic_dependent_launch_only_on_a_hopper_gpu(monkeypatch):
    """PDL launch options are on only for CUDA devices of compute capability 9+, never under the
    interpreter (its instructions do not exist there), and USE_PDL turns them off everywhere; the norm
    kernels' L2 prefetches before the wait go with PDL, and PREFETCH_L2 turns them off alone."""
    from ssmq.ops.triton import common

    off = {"PDL": False, "launch_pdl": False}
    assert common.pdl_options(torch.device("cpu")) == off
    assert common.prefetch_options(torch.device("cpu")) == {**off, "PREFETCH": False}
    monkeypatch.setattr(common, "_hopper_or_newer", lambda index: True)
    assert common.pdl_options(torch.device("cuda", 0)) == off  # this test runs under the interpreter
    monkeypatch.setattr(common, "INTERPRETED", False)
    on = {"PDL": True, "launch_pdl": True}
    assert common.pdl_options(torch.device("cuda", 0)) == on
    assert common.prefetch_options(torch.device("cuda", 0)) == {**on, "PREFETCH": True}
    monkeypatch.setattr(common, "PREFETCH_L2", False)
    assert common.prefetch_options(torch.device("cuda", 0)) == {**on, "PREFETCH": False}
    monkeypatch.setattr(common, "PREFETCH_L2", True)
    monkeypatch.setattr(common, "_hopper_or_newer", lambda index: False)
    assert common.prefetch_options(torch.device("cuda", 0)) == {**off, "PREFETCH": False}
    monkeypatch.setattr(common, "_hopper_or_newer", lambda index: True)
    monkeypatch.setattr(common, "USE_PDL", False)
    assert common.prefetch_options(torch.device("cuda", 0)) == {**off, "PREFETCH": False}
