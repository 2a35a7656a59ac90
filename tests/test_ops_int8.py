"""The reference int8 ops (docs/numerics.md) on hand-derived cases and against independent float math.

Expected integers in the hand cases are derived in the comments next to them. Float comparisons
dequantize with `codes * scale` written out here, run the float op, and quantize with torch.round.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ssmq.errors import SsmqError
from ssmq.ops.conv import causal_conv1d
from ssmq.ops.int8_conv import int8_causal_conv1d, int8_causal_conv1d_silu
from ssmq.ops.int8_embedding import int8_embedding, int8_lm_head, quantize_embedding
from ssmq.ops.int8_linear import MAX_K, int8_linear, int8_matmul, quantize_weight, weight_only_linear
from ssmq.ops.int8_norm import int8_add_rms_norm
from ssmq.ops.int8_scan import int8_selective_scan, int8_ssd_scan
from ssmq.ops.quantize import (check_scale, dequantize, quantize, quantize_per_token,
                               scale_from_amax)
from ssmq.ops.scan import selective_scan, ssd_scan


def i8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def ref_codes(values: torch.Tensor, scale) -> torch.Tensor:
    """Independent quantization of float values, in float64."""
    return torch.round(values.double() / torch.as_tensor(scale, dtype=torch.float64)).clamp(-128, 127)


def assert_codes_close(codes: torch.Tensor, expected: torch.Tensor, max_mismatch: float = 0.01) -> None:
    """Codes from float math computed two ways may differ by one step at rounding boundaries, never more."""
    diff = (codes.double() - expected.double()).abs()
    assert diff.max() <= 1
    assert (diff > 0).double().mean() <= max_mismatch


def rand_codes(*shape, gen) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


# ---- quantize -------------------------------------------------------------------------------------------

def test_quantize_rounds_half_to_even():
    x = f32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 126.5, -127.5, 3.5])
    assert quantize(x, 1.0).tolist() == [0, 2, 2, 0, -2, -2, 0, 126, -128, 4]


def test_quantize_saturates_and_maps_non_finite():
    x = f32([127.4, 127.6, 1000.0, -128.4, -128.6, -1e9, math.inf, -math.inf, math.nan])
    q = quantize(x, 1.0)
    assert q.dtype == torch.int8
    assert q.tolist() == [127, 127, 127, -128, -128, -128, 127, -128, 0]


def test_quantize_divides_by_scale_rather_than_multiplying_by_its_reciprocal():
    # fp32(0.3) = 0.300000011920929; -17.25 / it = -57.49999771 -> nearest fp32 -57.4999962 -> -57.
    # The reciprocal 3.3333332539 times -17.25 = -57.4999986 -> nearest fp32 -57.5 -> -58 (half to even).
    assert quantize(f32([-17.25]), f32(0.3)).tolist() == [-57]


def test_quantize_broadcasts_per_channel_and_dequantize_multiplies():
    x = f32([[1.0, 1.0, 1.0], [-2.0, 0.25, 0.375]])
    q = quantize(x, f32([1.0, 0.5, 0.25]))
    assert q.tolist() == [[1, 2, 4], [-2, 0, 2]]  # 0.25/0.5 = 0.5 -> 0; 0.375/0.25 = 1.5 -> 2
    assert dequantize(i8([-128, 0, 127]), 0.5).tolist() == [-64.0, 0.0, 63.5]
    with pytest.raises(TypeError):
        dequantize(f32([1.0]), 1.0)


def test_scale_from_amax_floors_at_1e6():
    assert scale_from_amax(254.0).item() == 2.0
    assert scale_from_amax(f32([127.0, 0.0])).tolist() == [1.0, f32(1e-6).item()]
    with pytest.raises(SsmqError, match="amax"):
        scale_from_amax(math.inf)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_invalid_scales_are_refused_by_name(bad):
    with pytest.raises(SsmqError, match="layers.3.conv.out"):
        check_scale(f32([1.0, bad]), "layers.3.conv.out")
    with pytest.raises(SsmqError, match="w_scale"):
        int8_linear(i8([[1]]), 1.0, i8([[1], [1]]), f32([1.0, bad]))
    with pytest.raises(SsmqError, match="out_scale"):
        int8_causal_conv1d_silu(i8([[[1]]]), 1.0, i8([[1, 1]]), 1.0, None, bad)


def test_missing_scale_is_refused():
    with pytest.raises(SsmqError, match="z_scale"):
        int8_selective_scan(i8([[[1]]]), 1.0, i8([[[1]]]), 1.0, torch.zeros(1, 1), i8([[[1]]]), 1.0,
                            i8([[[1]]]), 1.0, 1.0, z_q=i8([[[1]]]))


def test_quantize_per_token():
    x = f32([[127.0, -63.5, 0.5], [0.0, 0.0, 0.0], [254.0, 1.0, -3.0]])
    q, s = quantize_per_token(x)
    assert s.shape == (3, 1)
    assert s.flatten().tolist() == [1.0, f32(1e-6).item(), 2.0]
    assert q.tolist() == [[127, -64, 0], [0, 0, 0], [127, 0, -2]]  # -63.5 -> -64, 0.5 -> 0, -1.5 -> -2


# ---- linear ---------------------------------------------------------------------------------------------

def test_int8_matmul_is_exact_on_worst_case_values():
    k = 4096
    acc = int8_matmul(torch.full((1, k), -128, dtype=torch.int8), torch.full((2, k), -128, dtype=torch.int8))
    assert acc.dtype == torch.int32
    assert acc.tolist() == [[k * 16384] * 2]  # 4096 * 16384 = 2^26
    # 4095 * 16384 + 1 = 67092481 needs 27 significant bits: an fp32 accumulator would lose the +1.
    x = torch.full((1, k), -128, dtype=torch.int8)
    x[0, -1] = 1
    assert int8_matmul(x, x).item() == 67092481
    assert int(torch.tensor(67092481.0, dtype=torch.float32).item()) != 67092481


def test_int8_matmul_accepts_the_largest_safe_k_and_refuses_more():
    assert MAX_K == 131071  # floor((2^31 - 1) / 2^14)
    x = torch.full((1, MAX_K), -128, dtype=torch.int8)
    assert int8_matmul(x, x).item() == 131071 * 16384  # 2147467264 <= 2^31 - 1
    with pytest.raises(SsmqError, match="131071"):
        int8_matmul(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(1, MAX_K + 1, dtype=torch.int8))
    with pytest.raises(TypeError):
        int8_matmul(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int8))


def test_int8_linear_epilogue_hand_case():
    w_q, w_s, bias = i8([[3, 4], [-5, 6]]), f32([0.25, 2.0]), f32([1.0, -1.0])
    # acc = [1*3 + 2*4, 1*-5 + 2*6] = [11, 7]; v = [11 * (0.5*0.25) + 1, 7 * (0.5*2) - 1] = [2.375, 6.0]
    out = int8_linear(i8([[1, 2]]), 0.5, w_q, w_s, bias, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.tolist() == [[2.375, 6.0]]
    assert int8_linear(i8([[1, 2]]), 0.5, w_q, w_s, bias).dtype == torch.float16
    # per token: row 2 has codes doubled and scale halved -> same values
    out = int8_linear(i8([[1, 2], [2, 4]]), f32([[0.5], [0.25]]), w_q, w_s, bias, out_dtype=torch.float32)
    assert out.tolist() == [[2.375, 6.0], [2.375, 6.0]]
    # requantized: 2.375 / 0.25 = 9.5 -> 10 (half to even), 6 / 0.25 = 24; with 0.01: 237.5, 600 -> 127
    assert int8_linear(i8([[1, 2]]), 0.5, w_q, w_s, bias, out_scale=0.25).tolist() == [[10, 24]]
    assert int8_linear(i8([[1, 2]]), 0.5, w_q, w_s, bias, out_scale=0.01).tolist() == [[127, 127]]
    assert int8_linear(i8([[-1, -2]]), 0.5, w_q, w_s, None, out_scale=0.01).tolist() == [[-128, -128]]


def test_int8_linear_matches_float64_on_dequantized_values():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x_q, x_s = quantize_per_token(x)
    w_q, w_s = quantize_weight(w)
    expected = (x_q.double() * x_s.double()) @ (w_q.double() * w_s.double()[:, None]).t() + b.double()
    out = int8_linear(x_q, x_s, w_q, w_s, b, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    out_s = f32(0.05)
    assert_codes_close(int8_linear(x_q, x_s, w_q, w_s, b, out_scale=out_s), ref_codes(expected, out_s))
    # static per-tensor activation scale, per-tensor weight scale
    w_q1, w_s1 = quantize_weight(w, per_channel=False)
    out = int8_linear(x_q, 0.02, w_q1, w_s1, out_dtype=torch.float32)
    expected = (x_q.double() * 0.02) @ (w_q1.double() * w_s1.double()).t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_quantize_weight_and_weight_only_linear():
    w = f32([[127.0, -63.5, 1.0], [0.0, 0.0, 0.0], [254.0, 127.0, -1.0]])
    q, s = quantize_weight(w)
    assert s.tolist() == [1.0, f32(1e-6).item(), 2.0]
    assert q.tolist() == [[127, -64, 1], [0, 0, 0], [127, 64, 0]]  # 63.5 -> 64, -0.5 -> 0
    q, s = quantize_weight(w, per_channel=False)
    assert s.dim() == 0 and s.item() == 2.0
    assert q[0].tolist() == [64, -32, 0]  # 63.5 -> 64, -31.75 -> -32, 0.5 -> 0
    x = f32([[1.0, 2.0, 4.0]])
    q, s = quantize_weight(w)
    # rows dequantize to [127, -64, 1], [0, 0, 0], [254, 128, 0]
    out = weight_only_linear(x, q, s, f32([0.5, 0.5, 0.5]))
    assert out.dtype == torch.float32 and out.tolist() == [[127 - 128 + 4 + 0.5, 0.5, 254 + 256 + 0.5]]


# ---- conv -----------------------------------------------------------------------------------------------

def test_int8_conv_hand_case():
    # channel 0: w codes [1, 2, 3, 4] * 0.5, x codes 1 * 0.25 -> acc 4, 7, 9, 10 -> pre = acc / 8
    # channel 1: w codes [0, 0, 0, -1] * 1, x codes [100, -100, 5, 0] * 0.25, bias 0.5 -> pre = -x/4 + 0.5
    x_q = i8([[[1, 100], [1, -100], [1, 5], [1, 0]]])
    w_q, w_s, bias = i8([[1, 2, 3, 4], [0, 0, 0, -1]]), f32([0.5, 1.0]), f32([0.0, 0.5])
    pre, state = int8_causal_conv1d(x_q, f32([0.25, 0.25]), w_q, w_s, bias)
    assert pre[0, :, 0].tolist() == [0.5, 0.875, 1.125, 1.25]
    assert pre[0, :, 1].tolist() == [-24.5, 25.5, -0.75, 0.5]
    assert state.dtype == torch.int8 and state.tolist() == [[[1, -100], [1, 5], [1, 0]]]
    out, _ = int8_causal_conv1d_silu(x_q, 0.25, w_q, w_s, bias, 0.01)
    # silu(p) = p / (1 + exp(-p)): 0.31123, 0.61756, 0.84928, 0.97162 -> /0.01 -> 31, 62, 85, 97
    assert out[0, :, 0].tolist() == [31, 62, 85, 97]
    # silu(-24.5) ~ -6e-10 -> 0; silu(25.5) -> 2550 steps -> 127; silu(-0.75) = -0.24061 -> -24; 31
    assert out[0, :, 1].tolist() == [0, 127, -24, 31]
    # the SiLU minimum -0.27846 at scale 0.001 is -278 steps -> saturates to -128
    low, _ = int8_causal_conv1d_silu(i8([[[1]]]), 1.0, i8([[0, 1]]), f32(1.0), f32([-2.27846]), 0.001)
    assert low.item() == -128


def test_int8_conv_prefill_equals_chunks_and_single_steps():
    g = torch.Generator().manual_seed(1)
    b, l, c, k = 2, 13, 6, 4
    x_q, w_q = rand_codes(b, l, c, gen=g), rand_codes(c, k, gen=g)
    args = (torch.rand(c, generator=g) * 0.1 + 0.01, w_q, torch.rand(c, generator=g) * 0.01 + 0.001,
            torch.randn(c, generator=g), f32(0.02))
    state0 = rand_codes(b, k - 1, c, gen=g)
    full, full_state = int8_causal_conv1d_silu(x_q, *args, state=state0)
    first, st = int8_causal_conv1d_silu(x_q[:, :5], *args, state=state0)
    second, st = int8_causal_conv1d_silu(x_q[:, 5:], *args, state=st)
    assert torch.equal(torch.cat([first, second], 1), full) and torch.equal(st, full_state)
    st, steps = state0, []
    for t in range(l):
        out, st = int8_causal_conv1d_silu(x_q[:, t:t + 1], *args, state=st)
        steps.append(out)
        assert torch.equal(st, torch.cat([state0, x_q], 1)[:, t + 1:t + k])  # shift left, append the new codes
    assert torch.equal(torch.cat(steps, 1), full) and torch.equal(st, full_state)


def test_int8_conv_matches_float_conv_on_dequantized_values():
    g = torch.Generator().manual_seed(2)
    b, l, c, k = 2, 40, 16, 4
    x_q, w_q, state = rand_codes(b, l, c, gen=g), rand_codes(c, k, gen=g), rand_codes(b, k - 1, c, gen=g)
    x_s, w_s = torch.rand(c, generator=g) * 0.05 + 0.01, torch.rand(c, generator=g) * 0.01 + 0.001
    bias, out_s = torch.randn(c, generator=g), f32(0.01)
    pre_f, _ = causal_conv1d(x_q.float() * x_s, w_q.float() * w_s[:, None], bias, state.float() * x_s)
    pre, _ = int8_causal_conv1d(x_q, x_s, w_q, w_s, bias, state)
    torch.testing.assert_close(pre, pre_f, rtol=1e-5, atol=1e-5)
    out, _ = int8_causal_conv1d_silu(x_q, x_s, w_q, w_s, bias, out_s, state)
    assert_codes_close(out, ref_codes(F.silu(pre_f.double()), out_s))


# ---- Mamba1 scan ----------------------------------------------------------------------------------------

def grid_case():
    """A = 0, dt = 1 (no softplus), so h[t] = h[t-1] + u[t] * B[t] stays on the 1/8 grid:
    u = [1, 2, -1]; B = [[1, 0], [0, 1], [1, 1]]; h = [1, 0], [1, 2], [0, 1];
    C = [[1, 1], [1, 1], [1, -1]] -> y = [1, 3, -1]; with D = 0.5: y + 0.5 u = [1.5, 4, -1.5]."""
    u_q = i8([[[2], [4], [-2]]])                      # * 0.5
    delta_q = i8([[[1], [1], [1]]])                   # * 1.0
    B_q = i8([[[4, 0], [0, 4], [4, 4]]])              # * 0.25
    C_q = i8([[[1, 1], [1, 1], [1, -1]]])             # * 1.0
    return u_q, delta_q, B_q, C_q


def m1_scan(u_q, delta_q, B_q, C_q, state_scale, state_q=None, D=None):
    return int8_selective_scan(u_q, 0.5, delta_q, 1.0, torch.zeros(1, 2), B_q, 0.25, C_q, 1.0, state_scale,
                               D=D, delta_softplus=False, state_q=state_q, out_dtype=torch.float32)


def test_int8_selective_scan_hand_case_prefill_equals_steps():
    u_q, delta_q, B_q, C_q = grid_case()
    y, state = m1_scan(u_q, delta_q, B_q, C_q, 0.125)
    assert y[0, :, 0].tolist() == [1.0, 3.0, -1.0]
    assert state.dtype == torch.int8 and state.tolist() == [[[0, 8]]]  # h = [0, 1] / 0.125
    y, _ = m1_scan(u_q, delta_q, B_q, C_q, 0.125, D=f32([0.5]))
    assert y[0, :, 0].tolist() == [1.5, 4.0, -1.5]
    st, ys = None, []
    for t in range(3):
        y_t, st = m1_scan(u_q[:, t:t + 1], delta_q[:, t:t + 1], B_q[:, t:t + 1], C_q[:, t:t + 1], 0.125, st)
        ys.append(y_t)
    assert torch.cat(ys, 1)[0, :, 0].tolist() == [1.0, 3.0, -1.0] and st.tolist() == [[[0, 8]]]
    # an initial state [1, -1] = codes [8, -8]: h ends at [1, 0] -> codes [8, 0]
    _, state = m1_scan(u_q, delta_q, B_q, C_q, 0.125, state_q=i8([[[8, -8]]]))
    assert state.tolist() == [[[8, 0]]]
    # saturation: h = [0, 1] at scale 0.001 is 1000 steps -> 127
    assert m1_scan(u_q, delta_q, B_q, C_q, 0.001)[1].tolist() == [[[0, 127]]]


def test_int8_selective_scan_requantizes_the_state_once_per_call():
    # h gains 0.25 per step, state scale 0.5. One call of 2 steps: h = 0.5 -> code 1.
    # Two calls of 1 step: 0.25 / 0.5 = 0.5 -> code 0 (half to even), so h restarts from 0 -> code 0 again.
    args = dict(delta_softplus=False, out_dtype=torch.float32)
    one = i8([[[1], [1]]])
    _, state = int8_selective_scan(one, 0.25, one, 1.0, torch.zeros(1, 1), one, 1.0, one, 1.0, 0.5, **args)
    assert state.item() == 1
    st = None
    for t in range(2):
        _, st = int8_selective_scan(one[:, :1], 0.25, one[:, :1], 1.0, torch.zeros(1, 1), one[:, :1], 1.0,
                                    one[:, :1], 1.0, 0.5, state_q=st, **args)
    assert st.item() == 0


def test_int8_selective_scan_matches_float_scan_on_dequantized_values():
    g = torch.Generator().manual_seed(3)
    b, l, d, n = 2, 20, 8, 4
    u_q, delta_q, z_q = (rand_codes(b, l, d, gen=g) for _ in range(3))
    B_q, C_q, s0 = rand_codes(b, l, n, gen=g), rand_codes(b, l, n, gen=g), rand_codes(b, d, n, gen=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g) - 3
    sc = dict(u=f32(0.02), delta=f32(0.01), B=f32(0.01), C=f32(0.015), z=f32(0.03))
    state_s = torch.rand(d, 1, generator=g) * 0.02 + 0.01   # per channel, broadcast over (b, d, n)
    y, state = int8_selective_scan(u_q, sc["u"], delta_q, sc["delta"], A, B_q, sc["B"], C_q, sc["C"], state_s,
                                   D=D, z_q=z_q, z_scale=sc["z"], delta_bias=bias, state_q=s0)
    assert y.dtype == torch.float16 and state.dtype == torch.int8
    y_f, h_f = selective_scan(u_q.float() * sc["u"], delta_q.float() * sc["delta"], A, B_q.float() * sc["B"],
                              C_q.float() * sc["C"], D, z_q.float() * sc["z"], bias, True, s0.float() * state_s)
    torch.testing.assert_close(y.float(), y_f, rtol=2e-3, atol=1e-3)
    assert_codes_close(state, ref_codes(h_f, state_s))


# ---- Mamba2 SSD scan ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_int8_ssd_scan_hand_case_any_chunk_and_steps(chunk):
    u_q, _, B_q, C_q = grid_case()               # same numbers as the Mamba1 grid case, 1 head of dim 1
    x_q, B_q, C_q = u_q[..., None], B_q[:, :, None], C_q[:, :, None]
    dt_q = i8([[[4], [4], [4]]])                 # * 0.25 = 1.0

    def run(sl, state_q=None):
        return int8_ssd_scan(x_q[:, sl], 0.5, dt_q[:, sl], torch.zeros(1), B_q[:, sl], 0.25, C_q[:, sl], 1.0,
                             0.125, chunk, dt_scale=0.25, dt_softplus=False, state_q=state_q,
                             out_dtype=torch.float32)

    y, state = run(slice(0, 3))
    assert y.flatten().tolist() == [1.0, 3.0, -1.0] and state.tolist() == [[[[0, 8]]]]
    st, ys = None, []
    for t in range(3):
        y_t, st = run(slice(t, t + 1), st)
        ys.append(y_t)
    assert torch.cat(ys, 1).flatten().tolist() == [1.0, 3.0, -1.0] and torch.equal(st, state)
    y_fp, _ = int8_ssd_scan(x_q, 0.5, torch.ones(1, 3, 1), torch.zeros(1), B_q, 0.25, C_q, 1.0, 0.125, chunk,
                            dt_softplus=False, out_dtype=torch.float32)
    assert torch.equal(y_fp, y)  # float dt = 1.0 is the same as codes 4 * 0.25


def test_int8_ssd_scan_grouped_scales_match_float_scan():
    g = torch.Generator().manual_seed(4)
    b, l, heads, p, groups, n = 2, 11, 4, 3, 2, 5
    x_q, s0 = rand_codes(b, l, heads, p, gen=g), rand_codes(b, heads, p, n, gen=g)
    B_q, C_q = rand_codes(b, l, groups, n, gen=g), rand_codes(b, l, groups, n, gen=g)
    dt = torch.randn(b, l, heads, generator=g)
    A, D, bias = -torch.rand(heads, generator=g) - 0.5, torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    x_s = torch.rand(heads, p, generator=g) * 0.02 + 0.01           # per head and channel
    B_s, C_s = torch.rand(groups, 1, generator=g) * 0.01 + 0.005, torch.rand(groups, 1, generator=g) * 0.01 + 0.005
    state_s = torch.rand(heads, p, n, generator=g) * 0.05 + 0.01    # per state entry
    limit = (0.001, 5.0)
    y, state = int8_ssd_scan(x_q, x_s, dt, A, B_q, B_s, C_q, C_s, state_s, 4, D=D, dt_bias=bias, dt_limit=limit,
                             state_q=s0)
    y_f, h_f = ssd_scan(x_q.float() * x_s, dt, A, B_q.float() * B_s, C_q.float() * C_s, 4, D, bias, True, limit,
                        s0.float() * state_s)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), y_f, rtol=2e-3, atol=1e-3)
    assert_codes_close(state, ref_codes(h_f, state_s))


# ---- residual add + RMSNorm -----------------------------------------------------------------------------

def test_int8_add_rms_norm_hand_case():
    # residual + hidden = [1, -1, 1, -1]: mean square 1, so normed = weight * r = [1, -2, 0.5, -1]
    hidden, residual = f32([0.5, -1.0, 1.0, -1.5]), f32([0.5, 0.0, 0.0, 0.5])
    weight = f32([1.0, 2.0, 0.5, 1.0])
    codes, res = int8_add_rms_norm(hidden, residual, weight, 0.0, 0.5)
    assert codes.tolist() == [2, -4, 1, -2] and res.tolist() == [1.0, -1.0, 1.0, -1.0]
    # out scale 0.01: [100, -200, 50, -100] -> -200 saturates to -128
    codes, _ = int8_add_rms_norm(hidden, residual, weight, 0.0, 0.01)
    assert codes.tolist() == [100, -128, 50, -100]
    # first block: no residual, the hidden itself is normalised and becomes the residual
    codes, res = int8_add_rms_norm(f32([1.0, -1.0, 1.0, -1.0]), None, weight, 0.0, 0.5)
    assert codes.tolist() == [2, -4, 1, -2] and res.dtype == torch.float32


def test_int8_add_rms_norm_residual_dtype_and_float_reference():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 7, 64, generator=g).half()
    residual = torch.randn(2, 7, 64, generator=g).half()
    weight, out_s = torch.rand(64, generator=g).half() + 0.5, f32(0.02)
    codes, res = int8_add_rms_norm(hidden, residual, weight, 1e-5, out_s, residual_in_fp32=False)
    assert res.dtype == torch.float16
    r = res.double()
    normed = weight.double() * r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_codes_close(codes, ref_codes(normed, out_s))
    codes, res = int8_add_rms_norm(hidden, residual.float(), weight, 1e-5, out_s)
    assert res.dtype == torch.float32
    torch.testing.assert_close(res, residual.float() + hidden.float(), rtol=0, atol=0)


# ---- embedding and lm_head ------------------------------------------------------------------------------

def test_int8_embedding_and_lm_head():
    table = f32([[1.0, -127.0, 63.5], [0.0, 0.0, 0.0], [254.0, 127.0, -1.0]])
    codes, scales = quantize_embedding(table)
    assert codes.tolist() == [[1, -127, 64], [0, 0, 0], [127, 64, 0]]  # 63.5 -> 64; 63.5, -0.5 of row 3
    assert scales.tolist() == [1.0, f32(1e-6).item(), 2.0]
    rows = int8_embedding(torch.tensor([[2, 0]]), codes, scales)
    assert rows.dtype == torch.float16 and rows.tolist() == [[[254.0, 128.0, 0.0], [1.0, -127.0, 64.0]]]
    # W8A8: x = codes [1, 0, 1] * 0.5; acc = [1 + 64, 0, 127 + 0] = [65, 0, 127]; * (0.5 * row scale)
    logits = int8_lm_head(i8([[1, 0, 1]]), codes, scales, x_scale=0.5)
    assert logits.dtype == torch.float32 and logits.tolist() == [[32.5, 0.0, 127.0]]
    assert int8_lm_head(f32([[0.5, 0.0, 0.5]]), codes, scales).tolist() == [[32.5, 0.0, 127.0]]  # W8A16
