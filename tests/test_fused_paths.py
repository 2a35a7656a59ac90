"""The model paths the GPU runs, checked on the CPU: modules call ssmq.ops.dispatch (the kernels, under
the interpreter, give the reference results), fused ops replace a tap's intermediate only while no hook
listens there (hooks see exactly what the unfused forward computes), the residual add fused into the
next norm, the cached decay A, the shared int8 table of tied embeddings, fp32 scan parameters and the
scale book following the model's device."""

import pytest

from ssmq.ops.triton import HAS_TRITON

if HAS_TRITON:
    from ssmq.ops.triton.interpreter import use_interpreter

    use_interpreter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

import ssmq  # noqa: E402
from ssmq.bench.models import random_fp_model, random_quantized_model  # noqa: E402
from ssmq.models.config import MambaConfig  # noqa: E402
from ssmq.ops import conv, dispatch  # noqa: E402
from ssmq.quant.qmodel import load_quantized, save_quantized  # noqa: E402
from ssmq.quant.quantize import quantize  # noqa: E402

from conftest import random_ids, tiny_config  # noqa: E402

TINY = MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=64, d_state=4)
CAL = dict(n=2, seqlen=16, progress=False)


def w8a8(int8_head: bool = False):
    return random_quantized_model(TINY, "cpu", seed=1, quantize_embedding=int8_head, quantize_lm_head=int8_head)


def fp32_model():
    return random_fp_model(TINY, "cpu", dtype=torch.float32, seed=1)


def decode(model, ids, steps=3):
    """Logits of a prefill and `steps` greedy decoding steps, concatenated."""
    cache = model.new_cache()
    out = [model(ids, cache)[:, -1:]]
    for _ in range(steps):
        out.append(model(out[-1].argmax(-1), cache))
    return torch.cat(out, 1).float()


def test_has_hook_follows_registration():
    taps = fp32_model().taps
    name = "layers.1.conv.pre_act"
    assert not taps.has_hook(name)
    handle = taps.add("layers.*.conv.pre_act", lambda n, x: None)
    assert taps.has_hook(name) and not taps.has_hook("layers.1.conv.out")
    handle.remove()
    assert not taps.has_hook(name)


@pytest.mark.parametrize("build", [fp32_model, w8a8, lambda: w8a8(int8_head=True)])
@pytest.mark.parametrize("tap", ["layers.*.conv.pre_act", "layers.*.block.out"])
@torch.no_grad()
def test_fused_and_unfused_forwards_agree_exactly(build, tap):
    """A no-op hook switches conv + SiLU (+ quantize), or the residual add, back to separate ops: on the
    reference ops both orders of evaluation give bit-identical logits, in prefill and decoding."""
    model, ids = build(), random_ids(64, (2, 7))
    fused = decode(model, ids)
    with model.taps.hooked(tap, lambda name, x: None):
        unfused = decode(model, ids)
    assert torch.equal(fused, unfused)


@torch.no_grad()
def test_hooks_see_the_unfused_values():
    """Calibration and tracing hooks on conv.pre_act and block.out see the conv before SiLU and the residual
    stream, computed here independently from the taps before them."""
    model, ids = fp32_model(), random_ids(64, (1, 6))
    seen = {}

    def keep(name, x):
        seen[name] = x.clone()

    for tap in ("layers.0.in_proj.out", "layers.0.conv.pre_act", "layers.0.mixer.out", "layers.0.block.out",
                "layers.1.mixer.out", "layers.1.block.out"):
        model.taps.add(tap, keep)
    model(ids)
    mixer = model.backbone.layers[0].mixer
    x = seen["layers.0.in_proj.out"][..., :mixer.d_inner]
    expected_pre = conv.causal_conv1d(x, mixer.conv1d.weight[:, 0], mixer.conv1d.bias)[0]
    assert torch.allclose(seen["layers.0.conv.pre_act"], expected_pre, atol=1e-6)
    emb = model.backbone.embeddings(ids).float()
    assert torch.equal(seen["layers.0.block.out"], emb + seen["layers.0.mixer.out"])
    assert torch.equal(seen["layers.1.block.out"], seen["layers.0.block.out"] + seen["layers.1.mixer.out"])


@torch.no_grad()
def test_a_replacing_hook_on_the_pre_activation_still_takes_effect():
    model, ids = w8a8(), random_ids(64, (1, 6))
    base = model(ids)
    with model.taps.hooked("layers.0.conv.pre_act", lambda name, x: torch.zeros_like(x)):
        silenced = model(ids)
    assert not torch.equal(base, silenced)


@torch.no_grad()
def test_calibration_still_observes_the_pre_activation():
    model = fp32_model()
    seen = []
    with model.taps.hooked("layers.1.conv.pre_act", lambda name, x: seen.append(x.shape)):
        model.backbone(random_ids(64, (2, 5)), None)
    assert seen == [torch.Size([2, 5, model.config.d_inner])]


def test_modules_call_the_dispatch_ops():
    import ssmq.models.layers as layers
    import ssmq.quant.modules as modules
    import ssmq.quant.transforms as transforms

    assert layers.ops is dispatch and modules.ops is dispatch and transforms.ops is dispatch


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (pip install triton)")
@torch.no_grad()
def test_kernel_route_reproduces_the_reference_model(monkeypatch):
    """The whole W8A8 model (int8 embedding and head) with every op on its (interpreted) kernel against the
    same model on the reference ops: logits within float tolerance and the same greedy tokens
    (docs/numerics.md 6), in prefill and a decoding step."""
    from ssmq.ops.triton import linear

    model, ids = w8a8(int8_head=True), random_ids(64, (1, 4))
    ref = decode(model, ids, steps=1)
    monkeypatch.setattr(dispatch, "uses_kernels", lambda *tensors: True)
    # wide GEMV blocks (the interpreter runs programs one by one), on the dp4a kernel where K allows
    monkeypatch.setattr(linear, "_gemv_config", lambda n, k: dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, DP4A=1))
    fast = decode(model, ids, steps=1)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    assert float((fast - ref).norm() / ref.norm()) < 1e-2


@torch.no_grad()
def test_decay_is_cached_until_a_log_changes():
    mixer = fp32_model().backbone.layers[0].mixer
    a = mixer.decay(mixer.A_log)
    assert torch.equal(a, -torch.exp(mixer.A_log.float())) and mixer.decay(mixer.A_log) is a
    mixer.A_log.mul_(0.5)
    assert torch.equal(mixer.decay(mixer.A_log), -torch.exp(mixer.A_log.float()))
    mixer.A_log.data = mixer.A_log.data.double()
    assert mixer.decay(mixer.A_log).dtype == torch.float32
    with torch.enable_grad():
        p = torch.nn.Parameter(torch.rand(3, 2))
        mixer.decay(p).sum().backward()
    assert torch.allclose(p.grad, -torch.exp(p.detach()))


@pytest.fixture(scope="module")
def tied_fp():
    cfg = tiny_config("mamba1", vocab_size=50280)
    assert cfg.tie_embeddings
    return ssmq.build_model(cfg, seed=4)


@pytest.fixture(scope="module")
def int8_head_qm(tied_fp):
    from conftest import NEOX_TOKENIZER
    from tokenizers import Tokenizer

    return quantize(tied_fp, "quamba1", tokenizer=Tokenizer.from_file(str(NEOX_TOKENIZER)),
                    quantize_embedding=True, quantize_lm_head=True, **CAL)


@torch.no_grad()
def test_tied_int8_table_is_shared_saved_once_and_reloads_shared(int8_head_qm, tmp_path):
    qm = int8_head_qm
    emb, head = qm.backbone.embeddings, qm.lm_head
    assert head.weight is emb.weight and head.weight_scale is emb.weight_scale
    out = save_quantized(qm, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "backbone.embeddings.weight" in keys and not {"lm_head.weight", "lm_head.weight_scale"} & keys
    again = load_quantized(out)
    assert again.lm_head.weight is again.backbone.embeddings.weight
    assert again.lm_head.weight_scale is again.backbone.embeddings.weight_scale
    ids = random_ids(50280, (1, 9))
    assert torch.equal(again(ids), qm(ids))


@torch.no_grad()
def test_checkpoint_with_its_own_lm_head_copy_still_loads(int8_head_qm, tmp_path):
    """Checkpoints written before the table was shared hold lm_head's codes and scales separately."""
    import copy

    qm = copy.deepcopy(int8_head_qm)
    qm.lm_head.weight = qm.lm_head.weight.clone()
    qm.lm_head.weight_scale = qm.lm_head.weight_scale.clone()
    out = save_quantized(qm, tmp_path / "old")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    again = load_quantized(out)
    ids = random_ids(50280, (1, 9))
    assert torch.equal(again(ids), int8_head_qm(ids))


@torch.no_grad()
def test_scan_parameters_are_fp32_and_fp16_checkpoints_still_load(int8_head_qm, tied_fp, tmp_path):
    import copy

    qm = copy.deepcopy(int8_head_qm)
    mixer = qm.backbone.layers[0].mixer
    fp_mixer = tied_fp.backbone.layers[0].mixer
    for name in ("A_log", "D"):
        assert getattr(mixer, name).dtype == torch.float32
        assert torch.equal(getattr(mixer, name), getattr(fp_mixer, name))  # not rounded to fp16 on the way
    assert mixer.conv1d.bias.dtype == torch.float32 and mixer.dt_proj.bias.dtype == torch.float32
    assert qm.backbone.layers[0].norm.weight.dtype == torch.float16
    for name, p in qm.named_parameters():  # what earlier versions stored
        if name.endswith(("A_log", ".D", "conv1d.bias", "dt_proj.bias")):
            p.data = p.data.half()
    out = save_quantized(qm, tmp_path / "fp16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("backbone.layers.0.mixer.A_log").dtype == torch.float16
    again = load_quantized(out)
    a_log = again.backbone.layers[0].mixer.A_log
    assert a_log.dtype == torch.float32 and torch.equal(a_log, mixer.A_log.float())
    ids = random_ids(50280, (1, 6))
    assert torch.equal(again(ids), qm(ids))


def test_scale_book_follows_the_model_and_stays_fp32():
    qm = w8a8(int8_head=True)
    qm.to(torch.device("meta"))
    name = qm.scales.names()[0]
    assert qm.scales[name].device.type == "meta" and qm.scales[name].dtype == torch.float32
    assert qm.lm_head.weight is qm.backbone.embeddings.weight
    assert qm.lm_head.weight_scale is qm.backbone.embeddings.weight_scale
    qm = w8a8()
    qm.half()
    assert all(qm.scales[n].dtype == torch.float32 for n in qm.scales.names())


@torch.no_grad()
def test_fp_model_add_norm_matches_a_plain_residual_stream():
    """The fp forward (add fused into the next norm) against the pre-fusion formulation written out here:
    residual = emb; per block residual = residual + mixer(rms_norm(residual)); logits = head(rms_norm)."""
    model, ids = fp32_model(), random_ids(64, (2, 5))
    residual = model.backbone.embeddings(ids).float()

    def rms(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    for block in model.backbone.layers:
        residual = residual + block.mixer(rms(residual, block.norm.weight, block.norm.eps), None)
    norm_f = model.backbone.norm_f
    expected = F.linear(rms(residual, norm_f.weight, norm_f.eps), model.lm_head.weight)
    assert torch.allclose(model(ids), expected, atol=1e-5, rtol=1e-5)
