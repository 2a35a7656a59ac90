"""Selective-scan kernels (chunked prefill, one-token step) against the reference ops, on the CPU
through Triton's interpreter."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.ops import int8_scan, scan  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton import scan as tscan  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

B, D, N = 2, 8, 4
SMALL = dict(BLOCK_D=8, T=8, num_warps=4)  # three chunks for the longest test sequence


def inputs(length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xdbl = torch.randn(B, length, 2 * N + 3, generator=g)  # B and C are strided views, as from x_proj
    return dict(u=torch.randn(B, length, D, generator=g), delta=torch.randn(B, length, D, generator=g) * 0.5,
                A=-torch.rand(D, N, generator=g) - 0.1, B=xdbl[..., 3:3 + N], C=xdbl[..., 3 + N:],
                D=torch.randn(D, generator=g), z=torch.randn(B, length, D, generator=g),
                delta_bias=torch.randn(D, generator=g) * 0.1, state=torch.randn(B, D, N, generator=g))


@pytest.mark.parametrize("length", [19, 1])
@pytest.mark.parametrize("with_state", [False, True])
def test_float_scan(length, with_state):
    t = inputs(length)
    state = t["state"] if with_state else None
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, state)
    y, h = tscan.selective_scan(*args, torch.float32, config=SMALL)
    ref_y, ref_h = scan.selective_scan(*args)
    assert agreement(y, ref_y).rel_error < 1e-5 and agreement(h, ref_h).rel_error < 1e-5


@pytest.mark.parametrize("length", [19, 1])
def test_int8_scan(length):
    t = inputs(length, seed=1)
    s = {k: torch.tensor(0.02 + 0.005 * i) for i, k in enumerate(("u", "delta", "B", "C", "z", "state"))}
    q = {k: quantize(t[k], s[k]) for k in ("u", "delta", "B", "C", "z", "state")}
    for state in (None, q["state"]):
        y, h = tscan.selective_scan(q["u"], q["delta"], t["A"], q["B"], q["C"], t["D"], q["z"], t["delta_bias"],
                                    True, state, torch.float16, scales=s, config=SMALL)
        ref_y, ref_h = int8_scan.int8_selective_scan(
            q["u"], s["u"], q["delta"], s["delta"], t["A"], q["B"], s["B"], q["C"], s["C"], s["state"], D=t["D"],
            z_q=q["z"], z_scale=s["z"], delta_bias=t["delta_bias"], state_q=state)
        assert y.dtype == torch.float16 and agreement(y, ref_y).ok
        assert agreement(h, ref_h).ok


def test_scan_step_updates_state_in_place():
    t = inputs(1, seed=2)
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    ref_y, ref_h = scan.selective_scan(*args, t["state"])
    slot = t["state"].clone()
    y, h = tscan.selective_scan(*args, slot, torch.float32, inplace=True)
    assert h.data_ptr() == slot.data_ptr()
    assert agreement(slot, ref_h).rel_error < 1e-6 and agreement(y, ref_y).rel_error < 1e-6
