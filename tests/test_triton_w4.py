"""W4A16 and W4A8 linear kernels (GEMV and GEMM) against the reference ops, on the CPU through Triton's
interpreter, directly and through ssmq.ops.dispatch."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.errors import SsmqError  # noqa: E402
from ssmq.ops import dispatch  # noqa: E402
from ssmq.ops import int4_linear as ref  # noqa: E402
from ssmq.ops.int4 import pack_int4, quantize_int4, quantize_int4_two_level  # noqa: E402
from ssmq.ops.triton import w4  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

# M = 1 and 3 take the GEMV, 18 and 70 the tensor-core GEMM (two tile configurations); K = 80 is one group
# of 80 columns (K <= 128), 256 and 384 are groups of 128
SHAPES = [((1,), 24, 384), ((3,), 20, 80), ((2, 9), 33, 256), ((70,), 20, 256)]


def tiles(lead: tuple[int, ...], words: int = 1, x_tile: int = 0, preload: int = 1) -> dict[str, int] | None:
    """Fewer, wider GEMV programs: the interpreter's time grows with the number of programs. words=0 makes
    a W4A8 GEMV take the byte kernel instead of the int32-word (dp4a) one; x_tile=1 the word kernel's
    X_TILE loop, preload=0 without its first step taken before the loop."""
    if lead[0] <= w4.GEMV_MAX_ROWS and len(lead) == 1:
        return dict(BLOCK_N=8, WORDS=words, X_TILE=x_tile, PRELOAD=preload)
    return None


def w4a16_paths(lead: tuple[int, ...]) -> list[dict[str, int] | None]:
    """The GEMV for few rows; for more, the default dequantize + matmul and the tiled int4 GEMM."""
    return [tiles(lead)] if lead[0] <= w4.GEMV_MAX_ROWS and len(lead) == 1 else [None, dict(DEQUANT=0)]


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.1)


@pytest.mark.parametrize("lead,n,k", SHAPES)
def test_w4a16_linear(lead, n, k):
    g = torch.Generator().manual_seed(k)
    codes, scale = quantize_int4(weights(n, k, seed=n))
    packed, bias = pack_int4(codes), torch.randn(n, generator=g)
    for cfg in w4a16_paths(lead):
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(*lead, k, generator=g).to(dtype)
            out = w4.w4a16_linear(x, packed, scale, bias, config=cfg)
            expected = ref.w4a16_linear(x, packed, scale, bias)
            # fp16 outputs: the kernel and the reference sum in different orders, so some elements round to
            # the neighbouring fp16 value (one ulp is ~5e-4 relative), and the dequantized path also rounds
            # each weight to fp16 once; still well inside the 1e-3 float tolerance
            tolerance = (5e-4 if cfg is None else 1e-4) if dtype == torch.float16 else 1e-5
            assert out.dtype == dtype and agreement(out, expected).rel_error < tolerance, (cfg, dtype)
        out = w4.w4a16_linear(x, packed, scale, None, torch.float16, config=cfg)
        assert out.dtype == torch.float16
        assert agreement(out, ref.w4a16_linear(x, packed, scale, None, torch.float16)).ok


def test_w4a16_gemv_decodes_every_code_at_every_position():
    """Each of the 16 codes in each column of a group (rows shift the pattern), x small integers and
    power-of-two scales: every sum is exact in fp32, so the GEMV must equal the reference exactly."""
    k = 256
    codes = torch.stack([(torch.arange(k) + r).remainder(16) - 8 for r in range(16)]).to(torch.int8)
    scale = 2.0 ** torch.randint(-4, 4, (16, 2), generator=torch.Generator().manual_seed(1)).float()
    x = torch.randint(-3, 4, (1, k), generator=torch.Generator().manual_seed(2)).float()
    out = w4.w4a16_linear(x, pack_int4(codes), scale, config=dict(BLOCK_N=8))
    assert torch.equal(out, ref.w4a16_linear(x, pack_int4(codes), scale))
    assert torch.equal(out, x @ (codes.float() * scale.repeat_interleave(128, dim=1)).T)


def test_w4a16_dequantized_weights_are_the_reference_products():
    codes, scale = quantize_int4(weights(40, 384, seed=9))
    packed = pack_int4(codes)
    expected = codes.float() * scale.repeat_interleave(128, dim=1)
    assert torch.equal(w4.dequantize_w4a16(packed, scale, torch.float32), expected)
    assert torch.equal(w4.dequantize_w4a16(packed, scale, torch.float16), expected.half())


@pytest.mark.parametrize("words, x_tile, preload", [(1, 0, 1), (1, 1, 1), (1, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("lead,n,k", SHAPES)
def test_w4a8_linear_is_exact(lead, n, k, words, x_tile, preload):
    g = torch.Generator().manual_seed(k + 1)
    codes, s_c, gs = quantize_int4_two_level(weights(n, k, seed=n + 1))
    packed, bias = pack_int4(codes), torch.randn(n, generator=g)
    x = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
    per_token = torch.rand(*lead, 1, generator=g) * 0.01 + 1e-3
    cfg = tiles(lead, words, x_tile, preload)
    out = w4.w4a8_linear(x, per_token, packed, s_c, gs, bias, torch.float32, config=cfg)
    assert torch.equal(out, ref.w4a8_linear(x, per_token, packed, s_c, gs, bias, torch.float32))
    out = w4.w4a8_linear(x, torch.tensor(0.01), packed, s_c, gs, None, torch.float16, config=cfg)
    assert torch.equal(out, ref.w4a8_linear(x, 0.01, packed, s_c, gs, None, torch.float16))
    out = w4.w4a8_linear(x, per_token, packed, s_c, gs, bias, out_scale=torch.tensor(0.05), config=cfg)
    assert torch.equal(out, ref.w4a8_linear(x, per_token, packed, s_c, gs, bias, out_scale=0.05))


def test_w4a8_gemv_on_words_handles_every_nibble_and_byte():
    """All 16 codes against every int8 x value, at every lane of a word (the regrouping of x's bytes into
    even and odd columns, and code + 8 - 8 sum(x), exercised exhaustively)."""
    k = 256 * 16
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(k // 16).reshape(1, k)
    codes = torch.cat([codes, codes.roll(3, dims=1), codes.flip(1)])
    x = torch.arange(-128, 128, dtype=torch.int8).repeat_interleave(16).reshape(1, k)
    gs = torch.randint(1, 128, (3, k // 128), generator=torch.Generator().manual_seed(2), dtype=torch.int16)
    s_c = torch.tensor([1e-3, 2e-3, 3e-3])
    for xs in (x, x.roll(5, dims=1)):
        # X_TILE: the codes' bytes regrouped instead of x's, times 16; in steps of 8 groups, the first one
        # taken before the loop (PRELOAD) or in it
        for x_tile, preload in ((0, 0), (1, 0), (1, 1)):
            out = w4.w4a8_linear(xs, torch.tensor(1.0), pack_int4(codes), s_c, gs, None, torch.float32,
                                 config=dict(BLOCK_N=4, BLOCK_G=8, X_TILE=x_tile, PRELOAD=preload))
            assert torch.equal(out, ref.w4a8_linear(xs, 1.0, pack_int4(codes), s_c, gs, None, torch.float32))


def test_w4a8_extreme_codes_and_group_scales():
    """Every product at its largest (-128 * -8 * 127): the int32 sums are exact and fp32(acc) rounds as
    the reference's (acc above 2^24)."""
    n, k = 6, 512
    codes = torch.full((n, k), -8, dtype=torch.int8)
    codes[1::2, 1::2] = 7
    gs = torch.full((n, k // 128), 127, dtype=torch.int16)
    gs[:, 1] = 1
    s_c = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    for m, words, x_tile in ((1, 1, 0), (1, 1, 1), (1, 0, 0), (20, 1, 0)):
        x = torch.full((m, k), -128, dtype=torch.int8)
        out = w4.w4a8_linear(x, torch.tensor(1.0), pack_int4(codes), s_c, gs, None, torch.float32,
                             config=tiles((m,), words, x_tile))
        assert torch.equal(out, ref.w4a8_linear(x, 1.0, pack_int4(codes), s_c, gs, None, torch.float32))
    assert float(out.abs().max()) > 2 ** 24


@pytest.mark.parametrize("int_mm", [1, 0])
def test_w4a8_many_rows_int8_planes_and_tiled_gemm(int_mm, monkeypatch):
    """Prefill-sized W4A8, by the int8 planes + torch._int_mm path (16 * hi + lo; small chunk limits, so
    that it runs over several chunks of rows and of columns) and by the tiled GEMM: every code, with the
    extreme group scales and those where g * code carries between hi and lo, per-token and per-channel
    scales, a bias, float and int8 outputs, all bit-identical to the reference."""
    monkeypatch.setattr(w4, "INT_MM_ROWS", 32)
    monkeypatch.setattr(w4, "INT_MM_BYTES", 40_000)
    g = torch.Generator().manual_seed(11)
    n, k, m = 72, 256, 40
    codes = ((torch.arange(k) + torch.arange(n)[:, None] * 3) % 16 - 8).to(torch.int8)
    choices = torch.tensor([1, 2, 15, 16, 17, 63, 64, 65, 126, 127], dtype=torch.int16)
    gs = choices[torch.randint(0, len(choices), (n, k // 128), generator=g)]
    s_c, bias = torch.rand(n, generator=g) * 1e-3 + 1e-4, torch.randn(n, generator=g)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    x[0] = -128
    per_token = torch.rand(m, 1, generator=g) * 0.01 + 1e-3
    cfg = dict(INT_MM=int_mm)
    out = w4.w4a8_linear(x, per_token, pack_int4(codes), s_c, gs, bias, torch.float32, config=cfg)
    assert torch.equal(out, ref.w4a8_linear(x, per_token, pack_int4(codes), s_c, gs, bias, torch.float32))
    for out_scale in (torch.tensor(0.05), torch.rand(m, 1, generator=g) * 0.1 + 0.01):
        out = w4.w4a8_linear(x, per_token, pack_int4(codes), s_c, gs, bias, out_scale=out_scale, config=cfg)
        assert torch.equal(out, ref.w4a8_linear(x, per_token, pack_int4(codes), s_c, gs, bias, out_scale=out_scale))
    assert out.dtype == torch.int8 and int(out.max()) == 127 and int(out.min()) == -128  # saturation exercised


@pytest.mark.parametrize("inplace", [False, True])
def test_w4a8_linear_conv_step_is_the_projection_then_the_conv(inplace):
    """The in_proj GEMV with the conv step in its epilogue: the same codes, conv codes and state, bit for
    bit, as the reference projection followed by the reference conv on its channels start .. start + C;
    per-channel and per-tensor scales, a conv bias or none, two sequences."""
    from ssmq.ops import int8_conv

    g = torch.Generator().manual_seed(21)
    n, k, start, channels, kw = 40, 256, 8, 24, 4
    codes, s_c, gs = quantize_int4_two_level(weights(n, k, seed=21))
    packed, bias = pack_int4(codes), torch.randn(n, generator=g)
    x = torch.randint(-128, 128, (2, 1, k), generator=g, dtype=torch.int8)
    per_token = torch.rand(2, 1, 1, generator=g) * 0.01 + 1e-3
    conv_w = torch.randint(-127, 128, (channels, kw), generator=g, dtype=torch.int8)
    for out_scale, conv_ws, conv_os, conv_bias in (
            (torch.rand(n, generator=g) * 0.1 + 0.02, torch.rand(channels, generator=g) * 0.01 + 1e-3,
             torch.rand(channels, generator=g) * 0.05 + 0.01, torch.randn(channels, generator=g)),
            (torch.tensor(0.05), torch.tensor(0.004), torch.tensor(0.03), None)):
        state = torch.randint(-128, 128, (2, kw - 1, channels), generator=g, dtype=torch.int8)
        proj = ref.w4a8_linear(x, per_token, packed, s_c, gs, bias, out_scale=out_scale)
        seg_scale = out_scale[start:start + channels] if out_scale.dim() else out_scale
        conv, new_state = int8_conv.int8_causal_conv1d_silu(proj[..., start:start + channels], seg_scale, conv_w,
                                                            conv_ws, conv_bias, conv_os, state)
        held = state.clone()
        out = w4.w4a8_linear_conv_step(x, per_token, packed, s_c, gs, bias, out_scale, start, conv_w, conv_ws,
                                       conv_bias, conv_os, state, inplace=inplace, config=dict(BLOCK_N=8))
        assert out is not None
        assert torch.equal(out[0], proj) and torch.equal(out[1], conv) and torch.equal(out[2], new_state)
        assert (out[2] is state) == inplace and torch.equal(state, new_state if inplace else held)
    assert w4.w4a8_linear_conv_step(x, per_token, packed, s_c, gs, bias, out_scale, 4, conv_w, conv_ws, conv_bias,
                                    conv_os, state, config=dict(BLOCK_N=8)) is None  # not whole programs


def test_strided_rows_and_unknown_layouts():
    codes, s_c, gs = quantize_int4_two_level(weights(8, 128, seed=3))
    x = torch.randint(-128, 128, (1, 2, 256), dtype=torch.int8)[..., :128]  # a view with a row stride of 256
    out = w4.w4a8_linear(x, torch.tensor(0.01), pack_int4(codes), s_c, gs, out_scale=torch.tensor(0.3))
    assert torch.equal(out, ref.w4a8_linear(x, 0.01, pack_int4(codes), s_c, gs, out_scale=0.3))
    unaligned = torch.randint(-128, 128, (1, 132), dtype=torch.int8)[:, 4:]  # 4-byte but not 8-byte aligned:
    out = w4.w4a8_linear(unaligned, torch.tensor(0.01), pack_int4(codes), s_c, gs,  # X_TILE falls back
                         config=dict(X_TILE=1))
    assert torch.equal(out, ref.w4a8_linear(unaligned, 0.01, pack_int4(codes), s_c, gs))
    per_column = torch.rand(128) + 0.1
    assert w4.w4a8_linear(x, per_column, pack_int4(codes), s_c, gs) is None
    assert w4.w4a16_linear(torch.randn(2, 64), pack_int4(codes), s_c[:, None]) is None  # K does not match


@pytest.fixture
def kernels(monkeypatch):
    """Force dispatch onto the (interpreted) kernels."""
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)


def test_dispatch_routes_and_reports_bad_input(kernels):
    g = torch.Generator().manual_seed(7)
    w = weights(16, 256, seed=7)
    codes, scale = quantize_int4(w)
    x = torch.randn(2, 256, generator=g).half()
    assert agreement(dispatch.w4a16_linear(x, pack_int4(codes), scale), ref.w4a16_linear(x, pack_int4(codes), scale)).ok
    codes, s_c, gs = quantize_int4_two_level(w)
    xq = torch.randint(-128, 128, (2, 256), generator=g, dtype=torch.int8)
    out = dispatch.w4a8_linear(xq, torch.tensor(0.02), pack_int4(codes), s_c, gs, out_scale=torch.tensor(0.1))
    assert torch.equal(out, ref.w4a8_linear(xq, 0.02, pack_int4(codes), s_c, gs, out_scale=0.1))
    with pytest.raises(SsmqError, match="group scales must lie in"):
        dispatch.w4a8_linear(xq, torch.tensor(0.02), pack_int4(codes), s_c, torch.zeros_like(gs))
    with pytest.raises(SsmqError, match="w_scale"):
        dispatch.w4a8_linear(xq, torch.tensor(0.02), pack_int4(codes), torch.zeros_like(s_c), gs)
    with pytest.raises(SsmqError, match="does not match"):
        dispatch.w4a16_linear(x[:, :128], pack_int4(codes), scale)
