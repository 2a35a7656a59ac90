"""Hadamard rotation kernel (alone and fused with quantization) against the reference, on the CPU
through Triton's interpreter."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if not HAS_TRITON:
    pytest.skip("Triton is not installed: the kernel interpreter tests need it (pip install triton)",
                allow_module_level=True)

from ssmq.ops.triton.interpreter import use_interpreter  # noqa: E402

use_interpreter()

import torch  # noqa: E402

from ssmq.ops.hadamard import hadamard_transform  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton import hadamard as th  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402


def test_factorisation_keeps_tiles_small():
    assert th.factors(5120) == (128, 40)
    assert th.factors(1536) == (64, 24)
    assert th.factors(4096) == (128, 32)
    assert th.factors(96) is None  # P would be below the 16 rows of a tensor-core tile
    assert th.factors(100) is None  # not a Hadamard size


@pytest.mark.parametrize("n", [256, 192, 640, 768])  # 2^k, 12 * 2^k, 40 * 2^k; 768 splits rows in 2
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hadamard_and_quantize(n, dtype):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).to(dtype)  # decode: rows split
    ref = hadamard_transform(x.float())
    out = th.hadamard(x)
    assert out.dtype == torch.float32 and agreement(out, ref).rel_error < 1e-6
    scale = ref.abs().amax() / 127
    assert agreement(th.hadamard(x, scale), quantize(ref, scale)).ok


def test_hadamard_many_rows():
    """Past SPLIT_ROWS rows (prefill) each program takes a whole row."""
    x = torch.randn(th.SPLIT_ROWS + 2, 768, generator=torch.Generator().manual_seed(7)).half()
    assert agreement(th.hadamard(x), hadamard_transform(x.float())).rel_error < 1e-6


@pytest.mark.parametrize("n, group, rows, gate_q, wdtype", [
    (640, 640, 3, True, torch.float32),     # one group (mamba2-2.7b-like), tile rows split over programs
    (768, 96, 3, True, torch.float32),      # 8 groups of 4 tile rows (mamba2-8b-like)
    (256, 64, 70, False, torch.float16),    # float gate, fp16 weight, a whole row per program (prefill)
])
def test_gated_norm_hadamard_quantize_matches_the_two_ops(n, group, rows, gate_q, wdtype, monkeypatch):
    if rows < th.FUSED_NORM_MIN_ROWS:  # the kernel declines decoding sizes by default; it still computes them
        monkeypatch.setattr(th, "FUSED_NORM_MIN_ROWS", 1)
    from ssmq.ops.norm import gated_rms_norm

    gen = torch.Generator().manual_seed(n + group)
    y = torch.randn(rows, n, generator=gen).half()
    w = (torch.rand(n, generator=gen) + 0.5).to(wdtype)
    if gate_q:
        gate, gate_scale = torch.randint(-127, 128, (rows, n), generator=gen, dtype=torch.int8), torch.tensor(0.03)
        values = gate.float() * gate_scale
    else:
        gate, gate_scale = torch.randn(rows, n, generator=gen).half(), None
        values = gate
    normed = gated_rms_norm(y, values, w, 1e-5, group)
    rotated = hadamard_transform(normed.float())
    scale = rotated.abs().amax() / 127
    out = th.gated_norm_hadamard(y, gate, w, 1e-5, group, gate_scale, scale)
    assert out.dtype == torch.int8 and agreement(out, quantize(rotated, scale)).ok


def test_gated_norm_hadamard_declines_decoding_rows_of_several_groups():
    """Below FUSED_NORM_MIN_ROWS a row of several norm groups is declined (None), and the dispatch runs the
    norm's and the rotation's kernels, with the same result as the fused kernel; a row of one group is
    still fused."""
    from ssmq.ops import dispatch

    gen = torch.Generator().manual_seed(4)
    y, w = torch.randn(2, 768, generator=gen).half(), torch.rand(768, generator=gen) + 0.5
    gate, gs, scale = torch.randint(-127, 128, (2, 768), generator=gen, dtype=torch.int8), torch.tensor(0.03), 0.05
    assert th.gated_norm_hadamard(y, gate, w, 1e-5, 96, gs, torch.tensor(scale)) is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "uses_kernels", lambda *tensors: True)
        apart = dispatch.gated_norm_hadamard_quantize(y, gate, gs, w, 1e-5, 96, torch.tensor(scale))
        mp.setattr(th, "FUSED_NORM_MIN_ROWS", 1)
        fused = th.gated_norm_hadamard(y, gate, w, 1e-5, 96, gs, torch.tensor(scale))
    assert agreement(apart, fused).ok
    assert th.gated_norm_hadamard(y, gate, w, 1e-5, 768, gs, torch.tensor(scale)) is not None


def test_gated_norm_hadamard_refuses_groups_across_tile_rows():
    """A group that is not whole rows of the (P, |B'|) tile (768 = 32 x 24; 256 % 24 != 0): None, and the
    dispatch runs the two ops."""
    y, gate, w = torch.randn(1, 768).half(), torch.randn(1, 768).half(), torch.ones(768)
    assert th.gated_norm_hadamard(y, gate, w, 1e-5, 256, None, torch.tensor(0.1)) is None
