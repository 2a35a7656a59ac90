"""The quantized Mamba2 model on the kernel route (the Triton interpreter stands in for the GPU): the
grouped scale layouts its modules pass reach the kernels (no fallback to the reference) and the logits
match the reference route's, for a prefill and for decoding steps."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if HAS_TRITON:
    from ssmq.ops.triton.interpreter import use_interpreter

    use_interpreter()

import torch  # noqa: E402

import ssmq  # noqa: E402
from ssmq.data import CalibrationData  # noqa: E402
from ssmq.ops import dispatch  # noqa: E402
from ssmq.ops.triton import hadamard as kernels_hadamard  # noqa: E402
from ssmq.quant.quantize import quantize  # noqa: E402

from conftest import distinct_segment_scales, random_ids, tiny_config  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")


@torch.no_grad()
def test_grouped_w8a8_mamba2_runs_on_the_kernels(monkeypatch):
    cfg = tiny_config("mamba2", n_layer=1)
    fp = ssmq.build_model(cfg, seed=2)
    docs = CalibrationData.from_token_ids([random_ids(cfg.vocab_size, (20,), seed=s).tolist() for s in range(3)])
    qm = quantize(fp, "quamba2-w8a8", data=docs, progress=False)
    prompt = kernels_hadamard.FUSED_NORM_MIN_ROWS  # a prefill long enough for the fused norm + rotation
    ids = random_ids(cfg.vocab_size, (1, prompt + 1), seed=5)

    def run():
        cache = qm.new_cache()
        return torch.cat([qm(ids[:, :prompt], cache), qm(ids[:, prompt:], cache)], dim=1).float()

    reference = run()
    kernels = dispatch._k()
    calls: dict[str, list[bool]] = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            calls.setdefault(f"{module.__name__.rsplit('.', 1)[-1]}.{name}", []).append(out is not None)
            return out
        monkeypatch.setattr(module, name, wrapper)

    for module, name in [(kernels.ssd, "ssd_scan"), (kernels.conv, "conv1d"), (kernels.linear, "int8_linear"),
                         (kernels.hadamard, "gated_norm_hadamard"), (kernels.hadamard, "hadamard"),
                         (kernels.norm, "gated_rms_norm")]:
        spy(module, name)
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    routed = run()
    for name in ("ssd.ssd_scan", "conv.conv1d", "linear.int8_linear"):
        assert calls.get(name) and all(calls[name]), (name, calls.get(name))  # taken, never declined
    # into out_proj: the fused kernel for the prefill, the norm's and the rotation's kernels for the step
    # (the tiny config has two norm groups per row)
    assert calls["hadamard.gated_norm_hadamard"] == [True, False]
    assert calls["norm.gated_rms_norm"] == [True] and calls["hadamard.hadamard"] == [True]
    assert (routed - reference).norm() / reference.norm() < 2e-2


@torch.no_grad()
def test_w4a8_decoding_step_runs_in_proj_and_conv_in_one_kernel(monkeypatch):
    """A quamba2-w4a8 decoding step on the kernel route: in_proj's GEMV runs the conv step in its epilogue
    (no conv kernel for the step), with logits and cache states bit-identical to the same route run as
    two kernels, which a hook on `in_proj.x` forces (a hook must see the value between them)."""
    from ssmq.ops.triton import conv as kernels_conv
    from ssmq.ops.triton import w4 as kernels_w4

    from ssmq.bench.models import random_quantized_model

    cfg = tiny_config("mamba2", n_layer=1)
    qm = random_quantized_model(cfg, "cpu", "quamba2-w4a8", seed=3)
    distinct_segment_scales(qm)
    ids = random_ids(cfg.vocab_size, (2, 6), seed=7)
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    calls: dict[str, list] = {"fused": [], "conv steps": []}
    fused, conv1d = kernels_w4.w4a8_linear_conv_step, kernels_conv.conv1d
    monkeypatch.setattr(kernels_w4, "w4a8_linear_conv_step",
                        lambda *a, **kw: calls["fused"].append(fused(*a, **kw)) or calls["fused"][-1])
    monkeypatch.setattr(kernels_conv, "conv1d",
                        lambda x, *a, **kw: calls["conv steps"].append(x.shape[1] == 1) or conv1d(x, *a, **kw))

    def decode() -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = qm.new_cache()
        logits = [qm(ids[:, :4], cache)]
        for t in (4, 5):
            logits.append(qm(ids[:, t:t + 1], cache))
        return torch.cat(logits, dim=1), [s.codes if hasattr(s, "codes") else s for s in cache.conv + cache.ssm]

    logits, states = decode()
    assert len(calls["fused"]) == 2 * cfg.n_layer and all(out is not None for out in calls["fused"])
    assert not any(calls["conv steps"])  # the prefill's conv kernel only
    calls["fused"].clear()
    with qm.taps.hooked("layers.*.in_proj.x", lambda name, x: None):
        apart, apart_states = decode()
    assert not calls["fused"] and sum(calls["conv steps"]) == 2 * cfg.n_layer
    assert torch.equal(logits, apart)
    assert all(torch.equal(a, b) for a, b in zip(states, apart_states))


@torch.no_grad()
def test_only_a_models_linears_let_the_gemvs_load_weights_early(monkeypatch):
    """A model's W8A8 and W4A8 linears (and in_proj + conv) tell the kernels that their weights are constant
    (dispatch's constant_weights: the GEMV may load them before its PDL wait); a direct call of the op, whose
    weights a kernel still running might write, does not."""
    from ssmq.bench.models import random_quantized_model
    from ssmq.ops.triton import linear as kernels_linear
    from ssmq.ops.triton import w4 as kernels_w4

    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    seen: list[tuple[str, bool]] = []
    for module, name in ((kernels_linear, "int8_linear"), (kernels_w4, "w4a8_linear"),
                         (kernels_w4, "w4a8_linear_conv_step")):
        def spy(*a, _run=getattr(module, name), _name=name, **kw):
            seen.append((_name, kw.get("preload", False)))
            return _run(*a, **kw)
        monkeypatch.setattr(module, name, spy)
    cfg = tiny_config("mamba2", n_layer=1)
    ids = random_ids(cfg.vocab_size, (1, 2), seed=2)
    for recipe in ("quamba2-w8a8", "quamba2-w4a8"):
        qm = random_quantized_model(cfg, "cpu", recipe, seed=3)
        cache = qm.new_cache()
        qm(ids[:, :1], cache)
        qm(ids[:, 1:], cache)
    assert {name for name, _ in seen} == {"int8_linear", "w4a8_linear", "w4a8_linear_conv_step"}
    assert all(preload for _, preload in seen)
    seen.clear()
    x, w = torch.ones(1, 128, dtype=torch.int8), torch.ones(8, 128, dtype=torch.int8)
    dispatch.int8_linear(x, 0.1, w, 0.1)
    dispatch.w4a8_linear(x, 0.1, torch.zeros(8, 64, dtype=torch.uint8), 0.1, torch.ones(8, 1, dtype=torch.int16))
    assert seen == [("int8_linear", False), ("w4a8_linear", False)]
