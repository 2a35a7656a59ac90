"""GPTQ (ssmq.quant.gptq): lower output error than round to nearest on correlated inputs, RTN when the
Hessian is diagonal, determinism, validation, and Hessians from the right taps."""

import pytest
import torch

import ssmq
from ssmq.data import CalibrationData
from ssmq.errors import SsmqError
from ssmq.quant.gptq import W4A8, W4A16, GPTQConfig, HessianAccumulator, collect_hessians, gptq, gptq_model, rtn

from conftest import tiny_config


def correlated_inputs(k: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a random mixing of fewer latent factors) and of
    unequal scale, the case where GPTQ's error feedback pays off."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, k // 4, generator=gen)
    mix = torch.randn(k // 4, k, generator=gen)
    return latent @ mix + 0.05 * torch.randn(tokens, k, generator=gen)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return (x.double().t() @ x.double()) / x.shape[0]


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x.double() @ (w.double() - w_hat.double()).t()).norm().item()


@pytest.mark.parametrize("layout", [W4A16, W4A8])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(layout):
    x = correlated_inputs(256, 2048, seed=0)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    q = gptq(w, hessian(x), layout)
    r = rtn(w, layout)
    assert q.codes.dtype == torch.int8 and q.codes.min() >= -8 and q.codes.max() <= 7
    assert output_error(x, w, q.dequantize()) < 0.8 * output_error(x, w, r.dequantize())
    if layout == W4A8:
        assert q.group_scale.dtype == torch.int16
        assert q.group_scale.min() >= 1 and q.group_scale.max() <= 127
        # level 1 is fixed from the original weights: max over groups of max(amax / 7, 1e-6), / 127
        expected = (w.abs().reshape(48, 2, 128).amax(-1) / 7).clamp(min=1e-6).amax(-1) / 127
        assert torch.allclose(q.scale, expected)
    else:
        assert q.scale.shape == (48, 2)


@pytest.mark.parametrize("layout", [W4A16, W4A8])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(layout):
    # uncorrelated inputs: the inverse Hessian's Cholesky factor is diagonal, so no error is fed forward
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(3)).double() + 0.5)
    q, r = gptq(w, h, layout), rtn(w, layout)
    assert torch.equal(q.codes, r.codes)
    assert torch.equal(q.scale, r.scale)


def test_gptq_is_deterministic_and_dead_inputs_get_zero_codes():
    x = correlated_inputs(128, 512, seed=4)
    x[:, 7] = 0.0  # an input channel that never fires
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(5))
    a, b = gptq(w, hessian(x), W4A8), gptq(w, hessian(x), W4A8)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.group_scale, b.group_scale)
    assert a.codes[:, 7].eq(0).all()


def test_gptq_settings_and_shapes_are_validated():
    for bad in (0.0, -0.1, float("nan"), 1.5):
        with pytest.raises(SsmqError, match="damping"):
            GPTQConfig(damp=bad)
    with pytest.raises(SsmqError, match="block size 128 must be a positive multiple of the group size 96"):
        GPTQConfig(group_size=96)
    with pytest.raises(SsmqError, match="group size must be >= 1"):
        GPTQConfig(group_size=0, block_size=1)
    w = torch.randn(4, 200)
    with pytest.raises(SsmqError, match="backbone.layers.0.mixer.in_proj.*K=200.*group size 128"):
        gptq(w, torch.eye(200, dtype=torch.float64), W4A16, name="backbone.layers.0.mixer.in_proj")
    with pytest.raises(SsmqError, match="Hessian of shape \\(3, 3\\) does not match the weight's K=200"):
        gptq(w, torch.eye(3), W4A16)
    with pytest.raises(SsmqError, match="unknown int4 weight layout 'w3'"):
        gptq(torch.randn(4, 8), torch.eye(8), "w3")


@torch.no_grad()
def test_hessians_come_from_the_inputs_of_in_proj_out_proj_and_lm_head():
    model = ssmq.build_model(tiny_config("mamba1"), seed=0)
    data = CalibrationData.from_token_ids([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10, 12]])
    paths = ["backbone.layers.1.mixer.in_proj", "backbone.layers.0.mixer.out_proj", "lm_head"]
    seen = {p: HessianAccumulator(model.get_submodule(p).weight.shape[1]) for p in paths}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, args, p=p: seen[p].add(args[0]))
             for p in paths]
    for ids in data.token_ids:
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    got = collect_hessians(model, data, paths, progress=False)
    padded = collect_hessians(model, data, paths, batch_size=2, progress=False)  # one right-padded batch
    for p in paths:
        assert seen[p].tokens == 11
        assert torch.allclose(got[p], seen[p].result(), rtol=1e-10, atol=1e-12), p
        assert (padded[p] - got[p]).abs().max() <= 1e-5 * got[p].abs().max(), p  # fp32 forward rounding only
    with pytest.raises(SsmqError, match="no input tap for module 'backbone.layers.0.mixer.x_proj'"):
        collect_hessians(model, data, ["backbone.layers.0.mixer.x_proj"], progress=False)


@torch.no_grad()
def test_gptq_model_same_documents_same_codes_and_model_untouched():
    model = ssmq.build_model(tiny_config("mamba1"), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = CalibrationData.from_token_ids([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7]])
    layouts = {"backbone.layers.0.mixer.in_proj": W4A8, "backbone.layers.1.mixer.out_proj": W4A16}
    a = gptq_model(model, data, layouts, progress=False)
    b = gptq_model(model, data, layouts, progress=False)
    for p in layouts:
        assert torch.equal(a[p].codes, b[p].codes) and torch.equal(a[p].scale, b[p].scale)
    assert a["backbone.layers.0.mixer.in_proj"].layout == W4A8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
