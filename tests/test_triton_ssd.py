"""Mamba2 SSD-scan kernels (chunked prefill, one-token step; float and int8 with grouped scales) against the
reference ops, on the CPU through Triton's interpreter, directly and through ssmq.ops.dispatch."""

import math

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.ops import dispatch, int8_scan, scan  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton import ssd  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

BATCH, HEADS, HEADDIM, GROUPS, N = 2, 4, 8, 2, 8
SMALL = dict(BLOCK_P=16, T=16, num_warps=4, num_stages=1)  # three chunks for the longest test sequence
NO_LIMIT = (0.0, math.inf)


def inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Float inputs laid out as Mamba2's mixer passes them: x, B, C are views of one conv output row."""
    g = torch.Generator().manual_seed(seed)
    width = HEADS * HEADDIM + 2 * GROUPS * N
    xbc = torch.randn(BATCH, length, width + 5, generator=g)
    x = xbc[..., :HEADS * HEADDIM].unflatten(-1, (HEADS, HEADDIM))
    Bm = xbc[..., HEADS * HEADDIM:HEADS * HEADDIM + GROUPS * N].unflatten(-1, (GROUPS, N))
    Cm = xbc[..., HEADS * HEADDIM + GROUPS * N:width].unflatten(-1, (GROUPS, N))
    return dict(x=x, dt=torch.randn(BATCH, length, HEADS, generator=g), A=-torch.rand(HEADS, generator=g) - 0.5,
                B=Bm, C=Cm, D=torch.randn(HEADS, generator=g), dt_bias=torch.randn(HEADS, generator=g) * 0.1,
                state=torch.randn(BATCH, HEADS, HEADDIM, N, generator=g))


def grouped_scales(seed: int = 0) -> dict[str, torch.Tensor]:
    """Quamba2-like scale layouts, expanded to broadcast against the codes."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.rand(HEADS, HEADDIM, generator=g) * 0.02 + 0.01,
                B=torch.rand(GROUPS, 1, generator=g) * 0.02 + 0.01, C=torch.rand(GROUPS, 1, generator=g) * 0.02 + 0.01,
                state=torch.rand(HEADS, HEADDIM, N, generator=g) * 0.01 + 0.005,
                dt=torch.rand(HEADS, generator=g) * 0.02 + 0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length,with_state,limit", [(37, True, NO_LIMIT), (37, False, (0.05, 0.9)),
                                                     (1, True, NO_LIMIT)])
def test_float_ssd_scan(dtype, length, with_state, limit):
    t = inputs(length)
    x, Bm, Cm = (t[k].to(dtype) for k in ("x", "B", "C"))
    state = t["state"] if with_state else None
    y, h = ssd.ssd_scan(x, t["dt"], t["A"], Bm, Cm, t["D"], t["dt_bias"], True, limit, state, torch.float32,
                        config=SMALL)
    ref_y, ref_h = scan.ssd_scan(x, t["dt"], t["A"], Bm, Cm, 16, t["D"], t["dt_bias"], True, limit, state)
    assert agreement(y, ref_y).ok and agreement(h, ref_h).ok


def quantized(t: dict[str, torch.Tensor], s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(x=quantize(t["x"], s["x"]), B=quantize(2 * t["B"], s["B"]), C=quantize(2 * t["C"], s["C"]),
                state=quantize(0.3 * t["state"], s["state"]), dt=quantize(t["dt"], s["dt"]))


@pytest.mark.parametrize("length", [37, 1])
@pytest.mark.parametrize("int8_dt", [False, True])
def test_int8_ssd_scan_grouped_scales(length, int8_dt):
    t, s = inputs(length, seed=1), grouped_scales(1)
    q = quantized(t, s)
    dt, dt_scale = (q["dt"], s["dt"]) if int8_dt else (t["dt"], None)
    kernel_scales = {k: s[k] for k in ("x", "B", "C", "state")} | ({"dt": dt_scale} if int8_dt else {})
    for state in (None, q["state"]):
        y, h = ssd.ssd_scan(q["x"], dt, t["A"], q["B"], q["C"], t["D"], t["dt_bias"], True, (0.001, 2.0), state,
                            torch.float16, scales=kernel_scales, config=SMALL)
        ref_y, ref_h = int8_scan.int8_ssd_scan(q["x"], s["x"], dt, t["A"], q["B"], s["B"], q["C"], s["C"],
                                               s["state"], 16, dt_scale=dt_scale, D=t["D"], dt_bias=t["dt_bias"],
                                               dt_limit=(0.001, 2.0), state_q=state)
        assert y.dtype == torch.float16 and h.dtype == torch.int8
        assert agreement(y, ref_y).ok  # fp16 outputs: a last-bit rounding flip is ~5e-4 of a value
        assert agreement(h, ref_h).ok


def test_final_state_codes_match_over_a_long_prefill():
    """The state-update product keeps ~22 bits (a split fp16 operand): the requantized state matches the
    reference's codes, not merely to within float tolerance."""
    t, s = inputs(64, seed=2), grouped_scales(2)
    q = quantized(t, s)
    fine = s["state"] * 0.05  # a fine state grid: codes near +-127 magnify any rounding in the state
    y, h = ssd.ssd_scan(q["x"], t["dt"], t["A"], q["B"], q["C"], None, None, True, NO_LIMIT, None, torch.float32,
                        scales={**{k: s[k] for k in ("x", "B", "C")}, "state": fine}, config=SMALL)
    ref_y, ref_h = int8_scan.int8_ssd_scan(q["x"], s["x"], t["dt"], t["A"], q["B"], s["B"], q["C"], s["C"], fine, 16,
                                           out_dtype=torch.float32)
    assert agreement(y, ref_y).ok
    assert (ref_h.abs() == 127).float().mean() < 0.5  # the test means something: most codes are not saturated
    assert agreement(h, ref_h).match == 1.0


def test_scales_varying_along_the_sequence_take_the_reference():
    t, s = inputs(5, seed=3), grouped_scales(3)
    q = quantized(t, s)
    per_token = torch.rand(BATCH, 5, HEADS, 1) * 0.02 + 0.01
    args = (q["x"], t["dt"], t["A"], q["B"], q["C"], None, None, True, NO_LIMIT, None, torch.float16)
    assert ssd.ssd_scan(*args, scales={"x": per_token, "B": s["B"], "C": s["C"], "state": s["state"]}) is None
    per_state_index = torch.rand(GROUPS, N) * 0.02 + 0.01
    assert ssd.ssd_scan(*args, scales={"x": s["x"], "B": per_state_index, "C": s["C"], "state": s["state"]}) is None


@pytest.fixture
def kernels(monkeypatch):
    """Force dispatch onto the (interpreted) kernels."""
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)


def test_dispatch_routes_and_falls_back(kernels, monkeypatch):
    t, s = inputs(20, seed=4), grouped_scales(4)
    q = quantized(t, s)
    monkeypatch.setattr(ssd, "PREFILL_CONFIG", SMALL)
    y, h = dispatch.ssd_scan(t["x"].half(), t["dt"], t["A"], t["B"].half(), t["C"].half(), 256, t["D"], t["dt_bias"],
                             state=t["state"])
    ref_y, ref_h = scan.ssd_scan(t["x"].half(), t["dt"], t["A"], t["B"].half(), t["C"].half(), 256, t["D"],
                                 t["dt_bias"], state=t["state"])
    assert y.dtype == torch.float32 and agreement(y, ref_y).ok and agreement(h, ref_h).ok
    per_state_index = torch.rand(GROUPS, N) * 0.02 + 0.01  # no kernel layout: the reference answers
    args = (q["x"], s["x"], t["dt"], t["A"], q["B"], per_state_index, q["C"], s["C"], s["state"], 8)
    y, h = dispatch.int8_ssd_scan(*args, D=t["D"], state_q=q["state"])
    ref_y, ref_h = int8_scan.int8_ssd_scan(*args, D=t["D"], state_q=q["state"])
    assert torch.equal(y, ref_y) and torch.equal(h, ref_h)


def test_decode_step_updates_a_static_state_in_place(kernels):
    t, s = inputs(1, seed=5), grouped_scales(5)
    q = quantized(t, s)
    args = (q["x"], s["x"], t["dt"], t["A"], q["B"], s["B"], q["C"], s["C"], s["state"], 256)
    ref_y, ref_h = int8_scan.int8_ssd_scan(*args, D=t["D"], dt_bias=t["dt_bias"], state_q=q["state"])
    slot = dispatch.mark_static_state(q["state"].clone())
    y, h = dispatch.int8_ssd_scan(*args, D=t["D"], dt_bias=t["dt_bias"], state_q=slot)
    assert h is slot and agreement(slot, ref_h).ok and agreement(y, ref_y).ok
    float_slot = dispatch.mark_static_state(t["state"].clone())
    fargs = (t["x"].half(), t["dt"], t["A"], t["B"].half(), t["C"].half(), 256, t["D"], t["dt_bias"])
    ref_y, ref_h = scan.ssd_scan(*fargs, state=t["state"])
    y, h = dispatch.ssd_scan(*fargs, state=float_slot)
    assert h is float_slot and agreement(h, ref_h).rel_error < 1e-6 and agreement(y, ref_y).rel_error < 1e-6
    plain = q["state"].clone()
    _, h = dispatch.int8_ssd_scan(*args, state_q=plain)
    assert h is not plain and torch.equal(plain, q["state"])
