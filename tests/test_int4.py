"""The 4-bit weight reference ops (docs/numerics.md §7) on hand-derived cases and against independent math.

Independent computations here use Python integers or float64 with explicit per-group loops, never the
ops' own helpers.
"""

import pytest
import torch

from ssmq.errors import SsmqError
from ssmq.ops.int4 import (group_size_for, int4_embedding, pack_int4, quantize_int4, quantize_int4_two_level,
                           unpack_int4)
from ssmq.ops.int4_linear import MAX_K_W4A8, w4a16_linear, w4a8_linear, w4a8_matmul
from ssmq.ops.quantize import quantize


def i8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


# ---- packing --------------------------------------------------------------------------------------------

def test_pack_layout_by_hand():
    # (-8, 7): low nibble -8 & 0xF = 0x8, high nibble 7 -> 0x78 = 120
    # (0, -1): low 0x0, high -1 & 0xF = 0xF -> 0xF0 = 240
    # (3, -4): low 0x3, high -4 & 0xF = 0xC -> 0xC3 = 195
    packed = pack_int4(i8([[-8, 7, 0, -1, 3, -4]]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[120, 240, 195]]


def test_pack_unpack_round_trip_every_pair_and_every_byte():
    values = list(range(-8, 8))
    pairs = i8([[a, b] for a in values for b in values]).reshape(1, -1)  # every (even, odd) pair, -8 and 7 included
    assert torch.equal(unpack_int4(pack_int4(pairs)), pairs)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


def test_pack_refuses_odd_k_and_out_of_range_codes():
    with pytest.raises(SsmqError, match="even number of columns.*K=3"):
        pack_int4(i8([[1, 2, 3]]))
    with pytest.raises(SsmqError, match=r"\[-8, 7\]"):
        pack_int4(i8([[8, 0]]))


# ---- groups and round-to-nearest scales ----------------------------------------------------------------

def test_group_size_rule_and_error_names_the_module():
    assert group_size_for(96) == 96          # K <= 128: one group per output channel
    assert group_size_for(128) == 128
    assert group_size_for(512) == 128
    with pytest.raises(SsmqError, match="layers.0.mixer.x_proj.*K=200.*128"):
        group_size_for(200, 128, "layers.0.mixer.x_proj")


def test_quantize_int4_by_hand():
    # one group (K = 4 <= 128): amax 7 -> scale 1; 3.5 -> 4 and -2.5 -> -2 (half to even), 7 -> 7
    codes, scale = quantize_int4(torch.tensor([[7.0, 3.5, -2.5, 0.4]]))
    assert scale.tolist() == [[1.0]]
    assert codes.tolist() == [[7, 4, -2, 0]]
    # an all-zero row gets the floor scale 1e-6 and zero codes
    codes, scale = quantize_int4(torch.zeros(1, 4))
    assert scale.item() == pytest.approx(1e-6) and codes.abs().sum() == 0


def test_quantize_int4_groups_along_k():
    w = torch.zeros(2, 256)
    w[0, :128], w[0, 128:] = 0.7, -1.4    # group 0 amax 0.7, group 1 amax 1.4
    w[1, 5] = 14.0
    codes, scale = quantize_int4(w)
    assert scale.shape == (2, 2)
    assert torch.allclose(scale, torch.tensor([[0.1, 0.2], [2.0, 1e-6]]))
    assert codes[0, :128].eq(7).all() and codes[0, 128:].eq(-7).all()
    assert codes[1, 5] == 7 and codes[1].abs().sum() == 7


def test_two_level_scales_by_hand():
    # groups of 128 with amax 7 and 1.4: fp group scales 1.0 and 0.2 -> s_c = 1/127,
    # g = round(127 * 1.0) = 127 and round(127 * 0.2) = round(25.4) = 25
    w = torch.zeros(1, 256)
    w[0, 0], w[0, 128] = 7.0, -1.4
    codes, s_c, g = quantize_int4_two_level(w)
    assert s_c.item() == pytest.approx(1 / 127)
    assert g.dtype == torch.int16 and g.tolist() == [[127, 25]]
    # -1.4 / (25/127) = -7.112 -> -7
    assert codes[0, 0] == 7 and codes[0, 128] == -7
    deq = s_c[:, None] * (g.float().repeat_interleave(128, dim=1) * codes.float())
    assert deq[0, 0].item() == pytest.approx(7.0) and deq[0, 128].item() == pytest.approx(-7 * 25 / 127)


# ---- W4A16 ---------------------------------------------------------------------------------------------

def _independent_dequant(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    n, k = codes.shape
    w = torch.empty(n, k, dtype=torch.float64)
    for grp in range(k // group):
        cols = slice(grp * group, (grp + 1) * group)
        w[:, cols] = codes[:, cols].double() * scales[:, grp:grp + 1].double()
    return w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w4a16_linear_matches_float64_math(dtype):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (24, 256), generator=gen, dtype=torch.int8)
    scales = torch.rand(24, 2, generator=gen) * 0.1 + 0.01
    x = torch.randn(2, 5, 256, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen)
    out = w4a16_linear(x, pack_int4(codes), scales, bias)
    expected = x.double() @ _independent_dequant(codes, scales, 128).t() + bias.double()
    assert out.dtype == dtype and out.shape == (2, 5, 24)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert w4a16_linear(x, pack_int4(codes), scales, out_dtype=torch.float32).dtype == torch.float32


def test_w4a16_linear_shape_errors():
    codes = pack_int4(torch.zeros(4, 256, dtype=torch.int8))
    with pytest.raises(SsmqError, match="does not match the input's K=128"):
        w4a16_linear(torch.zeros(1, 128), codes, torch.ones(4, 2))
    with pytest.raises(SsmqError, match="3 group scale columns do not divide K=256"):
        w4a16_linear(torch.zeros(1, 256), codes, torch.ones(4, 3))
    with pytest.raises(SsmqError, match="w_scale is invalid"):
        w4a16_linear(torch.zeros(1, 256), codes, torch.zeros(4, 2))


# ---- W4A8 ----------------------------------------------------------------------------------------------

def _independent_acc(x_q: torch.Tensor, codes: torch.Tensor, g: torch.Tensor, group: int) -> list[list[int]]:
    """Python-integer accumulators: per group sum x*code, then sum g * acc_g."""
    xs, cs, gs = x_q.tolist(), codes.tolist(), g.tolist()
    out = []
    for row in xs:
        out.append([sum(gs[n][grp] * sum(row[k] * cs[n][k] for k in range(grp * group, (grp + 1) * group))
                        for grp in range(len(gs[n]))) for n in range(len(cs))])
    return out


def test_w4a8_integer_accumulation_is_exact():
    gen = torch.Generator().manual_seed(1)
    x_q = torch.randint(-128, 128, (3, 256), generator=gen, dtype=torch.int8)
    codes = torch.randint(-8, 8, (5, 256), generator=gen, dtype=torch.int8)
    g = torch.randint(1, 128, (5, 2), generator=gen, dtype=torch.int16)
    acc = w4a8_matmul(x_q, pack_int4(codes), g)
    assert acc.dtype == torch.int32
    assert acc.tolist() == _independent_acc(x_q, codes, g, 128)


def test_w4a8_extreme_codes_at_the_overflow_bound():
    # all x = -128, all codes = -8, all g = 127: acc = K * 128 * 8 * 127 = K * 130048
    k = MAX_K_W4A8 - 1  # even K just below the bound
    x_q = torch.full((1, k), -128, dtype=torch.int8)
    packed = pack_int4(torch.full((2, k), -8, dtype=torch.int8))
    g = torch.full((2, 1), 127, dtype=torch.int16)
    assert w4a8_matmul(x_q, packed, g).tolist() == [[k * 130048] * 2]
    assert (MAX_K_W4A8 + 1) * 130048 > 2 ** 31 - 1 >= MAX_K_W4A8 * 130048
    k_big = MAX_K_W4A8 + 1
    with pytest.raises(SsmqError, match="overflow"):
        w4a8_matmul(torch.zeros(1, k_big, dtype=torch.int8), torch.zeros(1, k_big // 2, dtype=torch.uint8),
                    torch.ones(1, 1, dtype=torch.int16))


def test_w4a8_linear_epilogue_order_and_requantization():
    gen = torch.Generator().manual_seed(2)
    x_q = torch.randint(-128, 128, (4, 64), generator=gen, dtype=torch.int8)
    codes = torch.randint(-8, 8, (6, 64), generator=gen, dtype=torch.int8)
    g = torch.randint(1, 128, (6, 1), generator=gen, dtype=torch.int16)
    s_c = torch.rand(6, generator=gen) * 1e-3 + 1e-4
    x_scale = torch.tensor(0.037)
    bias = torch.randn(6, generator=gen)
    acc = torch.tensor(_independent_acc(x_q, codes, g, 64), dtype=torch.float32)
    expected = acc * (x_scale * s_c) + bias  # fp32: scale product first, then acc times it, then + bias
    out = w4a8_linear(x_q, x_scale, pack_int4(codes), s_c, g, bias, out_dtype=torch.float32)
    assert torch.equal(out, expected)
    out_scale = torch.tensor(0.05)
    q = w4a8_linear(x_q, x_scale, pack_int4(codes), s_c, g, bias, out_scale=out_scale)
    assert torch.equal(q, torch.round(expected / out_scale).clamp(-128, 127).to(torch.int8))
    per_token = torch.rand(4, 1, generator=gen) * 0.05 + 0.01
    out = w4a8_linear(x_q, per_token, pack_int4(codes), s_c, g, out_dtype=torch.float32)
    assert torch.equal(out, acc * (per_token * s_c))


def test_w4a8_matches_dequantized_float_math():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 256, generator=gen)
    codes, s_c, g = quantize_int4_two_level(w)
    x = torch.randn(5, 256, generator=gen)
    x_scale = x.abs().max() / 127
    x_q = quantize(x, x_scale)
    out = w4a8_linear(x_q, x_scale, pack_int4(codes), s_c, g, out_dtype=torch.float32)
    w_deq = s_c.double()[:, None] * (codes.double() * g.double().repeat_interleave(128, dim=1))
    expected = (x_q.double() * x_scale.double()) @ w_deq.t()
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_w4a8_refuses_bad_group_scales_and_shapes():
    x_q = torch.zeros(1, 256, dtype=torch.int8)
    packed = torch.zeros(2, 128, dtype=torch.uint8)
    with pytest.raises(SsmqError, match=r"group scales must lie in \[1, 127\].*\[0, 1\]"):
        w4a8_matmul(x_q, packed, torch.tensor([[1, 0], [1, 1]], dtype=torch.int16))
    with pytest.raises(SsmqError, match=r"\[1, 128\]"):
        w4a8_matmul(x_q, packed, torch.tensor([[1, 128], [1, 1]], dtype=torch.int16))
    with pytest.raises(TypeError, match="integer"):
        w4a8_matmul(x_q, packed, torch.ones(2, 2))
    with pytest.raises(SsmqError, match="3 group scale columns do not divide K=256"):
        w4a8_matmul(x_q, packed, torch.ones(2, 3, dtype=torch.int16))
    with pytest.raises(SsmqError, match=r"K=128 \(expected \(N, 64\)\)"):
        w4a8_matmul(torch.zeros(1, 128, dtype=torch.int8), packed, torch.ones(2, 1, dtype=torch.int16))


def test_int4_embedding_rows_are_codes_times_group_scales():
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(-8, 8, (10, 256), generator=gen, dtype=torch.int8)
    scales = torch.rand(10, 2, generator=gen) + 0.1
    ids = torch.tensor([[3, 0, 9], [3, 3, 1]])
    rows = int4_embedding(ids, pack_int4(codes), scales, out_dtype=torch.float32)
    expected = _independent_dequant(codes, scales, 128)[ids].float()  # exact product, one rounding to fp32
    assert rows.shape == (2, 3, 256) and torch.equal(rows, expected)
