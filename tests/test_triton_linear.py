"""W8A8 linear and quantize kernels against the reference ops, on the CPU through Triton's interpreter."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.ops import int8_linear as ref  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton import linear, quant  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402


def codes(*shape, seed=0):
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


# M = 1 and 3 take the GEMV, 34 and 70 the tensor-core GEMM (two tile configurations)
@pytest.mark.parametrize("lead,n,k,per_token,per_channel", [
    ((1, 1), 24, 40, False, True), ((3,), 12, 70, True, False), ((2, 17), 33, 48, True, True),
    ((70,), 20, 32, False, False)])
def test_int8_linear_is_exact(lead, n, k, per_token, per_channel):
    g = torch.Generator().manual_seed(n * k)
    x, w = codes(*lead, k, seed=1), codes(n, k, seed=2)
    xs = torch.rand(*lead, 1, generator=g) * 0.01 + 1e-3 if per_token else torch.tensor(0.01)
    ws = torch.rand(n, generator=g) * 0.02 + 1e-3 if per_channel else torch.tensor([0.02])
    bias = torch.randn(n, generator=g)
    out = linear.int8_linear(x, xs, w, ws, bias, torch.float32)
    assert torch.equal(out, ref.int8_linear(x, xs, w, ws, bias, torch.float32))
    out = linear.int8_linear(x, xs, w, ws, None, torch.float16)
    assert torch.equal(out, ref.int8_linear(x, xs, w, ws, None, torch.float16))
    out_scale = torch.tensor(0.05)
    out = linear.int8_linear(x, xs, w, ws, bias, out_scale=out_scale)
    assert torch.equal(out, ref.int8_linear(x, xs, w, ws, bias, out_scale=out_scale))


def test_int8_linear_takes_strided_rows():
    """The x half of in_proj's output is a view with a row stride twice its width."""
    x = codes(1, 2, 64)[..., :32]
    w = codes(8, 32, seed=3)
    out = linear.int8_linear(x, torch.tensor(0.01), w, torch.tensor(0.02), out_scale=torch.tensor(0.3))
    assert torch.equal(out, ref.int8_linear(x, 0.01, w, 0.02, out_scale=0.3))


@pytest.mark.parametrize("preload", [0, 1])
@pytest.mark.parametrize("rows,n,k,block_k", [(1, 24, 40, 16), (3, 9, 64, 32), (2, 17, 160, 512)])
def test_dp4a_gemv_is_exact(rows, n, k, block_k, preload, monkeypatch):
    """The GEMV reading codes as int32 words (dp4a): exact on saturated codes, strided rows (dt_proj reads
    x_proj's output), several K blocks and a K tail, its first step taken before the loop (PRELOAD) or in
    it; a tuned configuration applies to its (N, K)."""
    x = codes(rows, k + 12, seed=4)[:, :k]
    x[0, :4] = -128
    w = codes(n, k, seed=5)
    w[0, :4] = -128
    ws = torch.rand(n, generator=torch.Generator().manual_seed(6)) * 0.02 + 1e-3
    cfg = {"BLOCK_N": 4, "BLOCK_K": block_k, "num_warps": 4, "DP4A": 1, "PRELOAD": preload}
    out = linear.int8_linear(x, torch.tensor(0.01), w, ws, None, torch.float32, config=cfg)
    assert torch.equal(out, ref.int8_linear(x, 0.01, w, ws, None, torch.float32))
    monkeypatch.setitem(linear.GEMV_TUNED, (n, k), cfg)
    out = linear.int8_linear(x, torch.tensor(0.01), w, ws, out_scale=torch.tensor(0.2))
    assert torch.equal(out, ref.int8_linear(x, 0.01, w, ws, out_scale=0.2))


def test_dp4a_falls_back_when_codes_are_not_words():
    """K not a multiple of 4: the plain GEMV runs instead (same results)."""
    x, w = codes(1, 30, seed=7), codes(5, 30, seed=8)
    out = linear.int8_linear(x, torch.tensor(0.01), w, torch.tensor(0.02), config={"DP4A": 1})
    assert torch.equal(out, ref.int8_linear(x, 0.01, w, 0.02))


def test_int8_linear_refuses_unknown_scale_layout():
    assert linear.int8_linear(codes(2, 8), torch.rand(8) + 0.1, codes(4, 8), torch.tensor(0.1)) is None


@pytest.mark.parametrize("scale_shape", [(), (7,), (3, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_is_exact(scale_shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 7, generator=g) * 4).to(dtype)
    scale = torch.rand(scale_shape, generator=g) * 0.1 + 0.01
    assert agreement(quant.quantize(x, scale), quantize(x, scale)).match == 1.0


def test_quantize_rounding_rule():
    """Ties to even, a correctly rounded division (not a reciprocal), saturation, NaN -> 0."""
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, -17.25, 1000.0, -1000.0, float("inf"), float("-inf"), float("nan")])
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0])
    out = quant.quantize(x, scale)
    assert out.tolist() == [0, 2, 2, -2, -57, 127, -128, 127, -128, 0]
    assert torch.equal(out, quantize(x, scale))
