"""Quamba2 W8A8 for Mamba2: head/channel reordering, grouped scales and their layouts, the int8 SSD scan
with grouped scales, recipes on Mamba2, save / strict reload of every option, decoding, bad input."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import ssmq
from ssmq.errors import SsmqError
from ssmq.eval.compare import layer_errors
from ssmq.ops.qtensor import QTensor, cat_channels
from ssmq.ops.norm import gated_rms_norm
from ssmq.quant.mamba2_modules import QuantGatedRMSNorm, QuantSSDScan, channel_scale, ssd_scale
from ssmq.quant.qmodel import QUANT_CONFIG, load_quantized, save_quantized
from ssmq.quant.quantize import calibrate_for_recipe, quantize
from ssmq.quant.reorder import check_permutation, permute_mixer, sort_and_cluster
from ssmq.quant.scalebook import ScaleBook, ScaleEntry

from conftest import NEOX_TOKENIZER, random_ids, tiny_config

CAL = dict(n=3, seqlen=24, progress=False)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    """A random Mamba2 with 2 SSD groups of 4 heads of 8 channels, and a real tokenizer."""
    cfg = ssmq.MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=50280, d_state=8, headdim=8,
                           ngroups=2, chunk_size=8)
    return ssmq.save(ssmq.build_model(cfg, seed=5), tmp_path_factory.mktemp("m2") / "fp", tokenizer=NEOX_TOKENIZER)


@pytest.fixture(scope="module")
def stats(fp_dir):
    return {r: calibrate_for_recipe(fp_dir, r, **CAL) for r in ("quamba2-w8a8", "quamba1", "minmax-static")}


# ---- reordering -------------------------------------------------------------------------------------


def _random_perm_keeping_heads(cfg, seed):
    """A random head order within each SSD group and a random channel order within each head."""
    g = torch.Generator().manual_seed(seed)
    per_group = cfg.nheads // cfg.ngroups
    heads = torch.cat([grp * per_group + torch.randperm(per_group, generator=g) for grp in range(cfg.ngroups)])
    return torch.cat([h * cfg.headdim + torch.randperm(cfg.headdim, generator=g) for h in heads.tolist()])


@pytest.mark.parametrize("overrides", [{}, dict(ngroups=4, headdim=4, d_model=32, proj_bias=True)])
@torch.no_grad()
def test_reordering_keeps_the_fp_model(overrides):
    cfg = tiny_config("mamba2", **overrides)
    model = ssmq.build_model(cfg, seed=1).float()
    for block in model.backbone.layers:  # non-trivial norm weights, D and biases, so that a wrong index shows
        block.mixer.norm.weight.uniform_(0.5, 1.5)
        block.mixer.D.uniform_(0.5, 1.5)
        if block.mixer.in_proj.bias is not None:
            block.mixer.in_proj.bias.normal_()
    ids = random_ids(cfg.vocab_size, (2, 19))
    before = model(ids)
    for i, block in enumerate(model.backbone.layers):
        permute_mixer(block.mixer, _random_perm_keeping_heads(cfg, i))
    after = model(ids)
    assert not torch.equal(before, after)  # rounding differs, so the weights did move
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_reordering_keeps_the_trained_fixture():
    model, _ = ssmq.load("tiny-mamba2", dtype="fp32")
    cfg = model.config
    ids = random_ids(cfg.vocab_size, (1, 40))
    before = model(ids)
    absmax = torch.rand(cfg.d_inner, generator=torch.Generator().manual_seed(0))
    for block in model.backbone.layers:
        permute_mixer(block.mixer, sort_and_cluster(absmax, cfg))
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-4)


def test_sort_and_cluster_sorts_heads_within_groups_and_channels_within_heads():
    cfg = tiny_config("mamba2")  # 8 heads of 8 channels, 2 SSD groups
    absmax = torch.rand(cfg.d_inner, generator=torch.Generator().manual_seed(4))
    perm = sort_and_cluster(absmax, cfg)
    check_permutation(perm, cfg, "test")
    new = absmax[perm].reshape(cfg.nheads, cfg.headdim)
    assert bool((new[:, 1:] >= new[:, :-1]).all())                 # channels ascending inside each head
    head_max = new.amax(-1).reshape(cfg.ngroups, -1)
    assert bool((head_max[:, 1:] >= head_max[:, :-1]).all())       # heads ascending inside each SSD group
    old_head = perm.reshape(cfg.nheads, cfg.headdim)[:, 0] // cfg.headdim
    assert sorted(old_head[:4].tolist()) == [0, 1, 2, 3] and sorted(old_head[4:].tolist()) == [4, 5, 6, 7]


def test_orders_that_change_the_function_are_refused():
    cfg = tiny_config("mamba2")
    swap_groups = torch.cat([torch.arange(32, 64), torch.arange(0, 32)])
    with pytest.raises(SsmqError, match="out of its SSD group"):
        check_permutation(swap_groups, cfg, "layer 0")
    mixed = torch.arange(64)
    mixed[[0, 8]] = mixed[[8, 0]]
    with pytest.raises(SsmqError, match="mixes channels of different heads"):
        check_permutation(mixed, cfg, "layer 0")


# ---- scale layouts ------------------------------------------------------------------------------------


def test_grouped_scale_layouts_match_a_per_channel_loop():
    cfg = tiny_config("mamba2")  # G=2, 4 heads per group, headdim 8, d_state 8
    x = torch.arange(1, 2 * 4 * 4 + 1, dtype=torch.float32).reshape(2, 4, 4)
    flat = channel_scale("layers.0.conv.x", x, cfg)
    for c in range(cfg.d_inner):
        head, p = divmod(c, cfg.headdim)
        g, h_in = divmod(head, 4)
        assert flat[c] == x[g, h_in, p // 2]  # 1 head per head group, 2 channels per channel group
    assert torch.equal(ssd_scale("layers.0.conv.x", x, cfg), flat.reshape(8, 8))
    b = torch.tensor([0.5, 2.0])
    assert torch.equal(channel_scale("layers.0.conv.B", b, cfg), torch.tensor([0.5] * 8 + [2.0] * 8))
    assert torch.equal(ssd_scale("layers.0.conv.B", b, cfg), b.reshape(2, 1))
    state = torch.rand(2, 8)
    expanded = ssd_scale("layers.0.ssm.state", state, cfg)
    assert expanded.shape == (8, 1, 8)
    for h in range(8):
        assert torch.equal(expanded[h, 0], state[h // 4])
    assert ssd_scale("layers.0.ssm.state", torch.tensor(0.1), cfg).shape == ()
    with pytest.raises(SsmqError, match=r"layers.0.conv.x has shape \(3, 4, 4\)"):
        channel_scale("layers.0.conv.x", torch.ones(3, 4, 4), cfg)


def test_qtensor_cat_and_reshape_carry_scales():
    a = QTensor(torch.ones(2, 3, 4, dtype=torch.int8), torch.tensor(0.5))
    b = QTensor(torch.ones(2, 3, 2, dtype=torch.int8), torch.tensor([1.0, 2.0]))
    c = cat_channels([a, b])
    assert torch.equal(c.scale, torch.tensor([0.5] * 4 + [1.0, 2.0]))
    torch.testing.assert_close(c.dequantize()[..., 4:], b.dequantize())
    r = c.reshape(2, 3, 3, 2)
    assert r.scale.shape == (3, 2) and torch.equal(r.dequantize().reshape(2, 3, 6), c.dequantize())


def test_cat_channels_joins_adjacent_slices_without_a_copy():
    """Mamba2's x | B | C are adjacent slices of the in_proj output: joined as a view (codes and per-channel
    scales); anything else is copied as torch.cat does, with the same values."""
    out = torch.randn(2, 5, 12)
    x, B, C = out[..., 2:6], out[..., 6:9], out[..., 9:11]
    joined = cat_channels([x, B, C])
    assert joined.data_ptr() == x.data_ptr() and torch.equal(joined, torch.cat([x, B, C], -1))
    codes, scale = torch.randint(-9, 9, (2, 5, 12), dtype=torch.int8), torch.rand(12) + 0.1
    parts = QTensor(codes, scale).split([2, 4, 3, 2, 1])
    q = cat_channels(parts[1:4])
    assert q.codes.data_ptr() == parts[1].codes.data_ptr() and q.scale.data_ptr() == parts[1].scale.data_ptr()
    torch.testing.assert_close(q.dequantize(), QTensor(codes, scale).dequantize()[..., 2:11])
    buf = torch.arange(12.0)
    overlapping = [buf.as_strided((3, 2), (2, 1), 0), buf.as_strided((3, 2), (2, 1), 2)]  # rows 2 apart
    for case in ([x, C], [C, x], overlapping, [x.clone().requires_grad_(), B]):
        joined = cat_channels(case)
        assert joined.data_ptr() != case[0].data_ptr() and torch.equal(joined, torch.cat(case, -1))

def test_qtensor_reshape_to_one_group_adds_a_unit_dimension():
    codes = torch.arange(-12, 12, dtype=torch.int8).reshape(2, 3, 4)
    for scale in (torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.rand(2, 3, 1) + 0.1):
        q = QTensor(codes, scale)
        r = q.reshape(2, 3, 1, 4)
        assert r.codes.shape == (2, 3, 1, 4)
        assert torch.equal(r.dequantize(), q.dequantize().reshape(2, 3, 1, 4))
    with pytest.raises(ValueError, match="last dimension only"):
        QTensor(codes, torch.rand(2, 3, 1)).reshape(6, 4)


@torch.no_grad()
@pytest.mark.parametrize("recipe", ["quamba2-w8a8", "quamba1", "minmax-static"])
def test_one_ssd_group_quantizes_and_decodes(tmp_path, recipe):
    """ngroups=1, the layout of every released mamba2 checkpoint: B and C are (b, l, 1, d_state)."""
    cfg = ssmq.MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=50280, d_state=8, headdim=8,
                           ngroups=1, chunk_size=8)
    fp_path = ssmq.save(ssmq.build_model(cfg, seed=6), tmp_path / "fp", tokenizer=NEOX_TOKENIZER)
    fp, _ = ssmq.load(fp_path)
    qm = quantize(fp_path, recipe, stats=calibrate_for_recipe(fp_path, recipe, **CAL), progress=False)
    ids = random_ids(50000, (1, 10), seed=7)
    assert 0 < layer_errors(fp, qm, ids)["logits"] < 0.1
    cache = qm.new_cache()
    qm(ids[:, :8], cache)
    assert torch.isfinite(qm(ids[:, 8:9], cache)).all()


@torch.no_grad()
def test_quantized_gated_norm_follows_weight_edits_and_dtype_moves():
    """The norm keeps an fp32 copy of its weight between calls; an in-place edit, a dtype move and a
    reload must each reach the output (compared with the norm on the weight as it is now)."""
    torch.manual_seed(0)
    norm = QuantGatedRMSNorm(16, 1e-5, 8)
    y, codes, scale = torch.randn(3, 16), torch.randint(-127, 128, (3, 16), dtype=torch.int8), torch.tensor(0.02)
    z = QTensor(codes, scale)

    def expected() -> torch.Tensor:
        return gated_rms_norm(y, codes.float() * scale, norm.weight.detach().float(), 1e-5, 8)

    torch.testing.assert_close(norm(y, z).value(), expected(), rtol=0, atol=0)
    with torch.no_grad():
        norm.weight.mul_(torch.linspace(0.5, 2.0, 16))
    torch.testing.assert_close(norm(y, z).value(), expected(), rtol=0, atol=0)
    with torch.no_grad():
        norm.weight.add_(1 / 3)  # not exact in fp16: the fp16 model's output differs from the fp32 one
    out32 = norm(y, z).value()
    norm.half()
    torch.testing.assert_close(norm(y, z).value(), expected(), rtol=0, atol=0)
    assert not torch.equal(norm(y, z).value(), out32)
    norm.load_state_dict({"weight": torch.ones(16, dtype=torch.float16)})
    torch.testing.assert_close(norm(y, z).value(), expected(), rtol=0, atol=0)


@torch.no_grad()
def test_gated_norm_feeds_the_rotation_as_one_op():
    """QuantGatedRMSNorm defers its output; QuantHadamard computes norm, rotation and quantization in one op
    (one kernel on a GPU) with the codes of the two ops in sequence, and materialises it without rotation."""
    from ssmq.ops.hadamard import hadamard_transform
    from ssmq.ops.quantize import quantize as quantize_codes
    from ssmq.quant.modules import ActQuant, QuantHadamard

    torch.manual_seed(1)
    norm = QuantGatedRMSNorm(64, 1e-5, 16)
    norm.weight.mul_(torch.rand(64) + 0.5)
    y, z = torch.randn(2, 1, 64), QTensor(torch.randint(-127, 128, (2, 1, 64), dtype=torch.int8), torch.tensor(0.02))
    book = ScaleBook({"layers.0.out_proj.in": ScaleEntry(torch.tensor(0.05), "test")})
    normed = norm(y, z).value()
    for rotate in (True, False):
        out = QuantHadamard(rotate, ActQuant(book, "layers.0.out_proj.in"))(norm(y, z))
        expected = quantize_codes(hadamard_transform(normed) if rotate else normed, torch.tensor(0.05))
        assert torch.equal(out.codes, expected) and out.scale is book["layers.0.out_proj.in"]


def test_int8_ssd_scan_with_grouped_scales_matches_a_plain_recurrence():
    cfg = tiny_config("mamba2", chunk_size=4)
    H, P, G, N, L = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, 7
    gen = torch.Generator().manual_seed(7)
    xs = torch.rand(G, 4, 4, generator=gen) * 0.02 + 0.01
    bs, cs, ss = (torch.rand(G, generator=gen) * 0.02 + 0.01 for _ in range(3))
    state_s = torch.rand(G, N, generator=gen) * 0.02 + 0.01
    book = ScaleBook({n: ScaleEntry(v, "test") for n, v in [("layers.0.conv.x", xs), ("layers.0.conv.B", bs),
                                                             ("layers.0.conv.C", cs), ("layers.0.ssm.state", state_s)]})
    scan = QuantSSDScan(cfg.chunk_size, (0.0, float("inf")), book, "layers.0.conv.x", "layers.0.conv.B",
                        "layers.0.conv.C", "layers.0.ssm.state", cfg)
    ints = lambda *shape: torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)  # noqa: E731
    x_q, B_q, C_q, dt_q = ints(1, L, H, P), ints(1, L, G, N), ints(1, L, G, N), ints(1, L, H)
    dt_scale = torch.tensor(0.01)
    A, D, dt_bias = -torch.rand(H, generator=gen), torch.rand(H, generator=gen), torch.rand(H, generator=gen) - 2
    y, last = scan(QTensor(x_q, torch.tensor(1.0)), QTensor(dt_q, dt_scale), A, QTensor(B_q, torch.tensor(1.0)),
                   QTensor(C_q, torch.tensor(1.0)), D, dt_bias, None)
    # independent: dequantize by explicit group lookups, then the step-by-step recurrence in float64
    S = torch.zeros(H, P, N, dtype=torch.float64)
    for t in range(L):
        for h in range(H):
            g = h // 4
            xv = torch.tensor([x_q[0, t, h, p].item() * xs[g, h % 4, p // 2].item() for p in range(P)],
                              dtype=torch.float64)
            Bv, Cv = B_q[0, t, g].double() * bs[g].item(), C_q[0, t, g].double() * cs[g].item()
            step = F.softplus(torch.tensor(dt_q[0, t, h].item() * 0.01 + dt_bias[h].item(), dtype=torch.float64))
            S[h] = torch.exp(step * A[h].item()) * S[h] + step * xv[:, None] * Bv[None, :]
            expect = S[h] @ Cv + D[h].item() * xv
            torch.testing.assert_close(y[0, t, h].double(), expect, rtol=2e-3, atol=2e-3)
    state_scale = state_s.repeat_interleave(4, dim=0)[:, None, :]
    assert last.codes.dtype == torch.int8 and torch.equal(last.scale, state_scale)
    assert (last.codes.float() - torch.clamp(torch.round(S.float() / state_scale), -128, 127)).abs().max() <= 1


# ---- recipes, checkpoints, decoding -----------------------------------------------------------------------


def test_quamba2_w8a8_scales_have_the_grouped_shapes(fp_dir, stats):
    qm = quantize(fp_dir, "quamba2-w8a8", stats=stats["quamba2-w8a8"], progress=False)
    assert qm.scales["layers.1.conv.x"].shape == (2, 4, 4)
    assert qm.scales["layers.1.conv.B"].shape == (2,) and qm.scales["layers.1.conv.C"].shape == (2,)
    assert qm.scales["layers.1.ssm.state"].shape == (2, 8)
    assert qm.scales["layers.1.in_proj.x"].shape == () and qm.scales["layers.1.out_proj.in"].shape == ()
    assert qm.quant_config["transforms"] == ["fold_norms", "reorder_heads", "rotate_out_proj"]
    perms = qm.quant_config["calibration"]["transform_params"]["reorder_heads"]["permutations"]
    assert len(perms) == 2 and sorted(perms[0]) == list(range(64))
    # after reordering, the conv.x maxima of each layer ascend inside each head, as sort_and_cluster promised
    absmax = stats["quamba2-w8a8"].tap("layers.0.conv.x").channel_absmax.reshape(8, 8)
    assert bool((absmax[:, 1:] >= absmax[:, :-1] * (1 - 1e-5)).all())
    per_tensor = quantize(fp_dir, "quamba1", stats=stats["quamba1"], progress=False)
    assert all(e.value.numel() == 1 for _, e in per_tensor.scales.items())
    assert per_tensor.scales.entry("layers.0.conv.x").observer == "percentile"


@pytest.mark.parametrize("recipe,embedding,head", list(itertools.product(
    ["quamba2-w8a8", "quamba1", "minmax-static"], [False, True], [False, True])))
@torch.no_grad()
def test_every_option_round_trips(tmp_path, fp_dir, stats, recipe, embedding, head):
    qm = quantize(fp_dir, recipe, stats=stats[recipe], quantize_embedding=embedding, quantize_lm_head=head,
                  progress=False)
    out = save_quantized(qm, tmp_path / "q", fp_dir / "tokenizer.json")
    again = load_quantized(out)
    ids = random_ids(50000, (2, 13))
    assert torch.equal(qm(ids), again(ids))
    qc = json.loads((out / QUANT_CONFIG).read_text())
    assert qc["options"] == {"quantize_embedding": embedding, "quantize_lm_head": head, "alpha": None, "rules": []}


@torch.no_grad()
def test_grouped_w8a8_stays_close_to_fp(fp_dir, stats):
    fp, _ = ssmq.load(fp_dir)
    ids = random_ids(50000, (1, 48), seed=3)
    for recipe in ("quamba2-w8a8", "quamba1"):
        err = layer_errors(fp, quantize(fp_dir, recipe, stats=stats[recipe], progress=False), ids)["logits"]
        assert 0 < err < 0.1, (recipe, err)


@torch.no_grad()
def test_decoding_with_cache_follows_the_prefill(fp_dir, stats):
    qm = quantize(fp_dir, "quamba2-w8a8", stats=stats["quamba2-w8a8"], progress=False)
    ids = random_ids(50000, (1, 12), seed=4)
    full = qm(ids).float()
    cache = qm.new_cache()
    steps = [qm(ids[:, :8], cache).float()]
    for t in range(8, 12):
        steps.append(qm(ids[:, t:t + 1], cache).float())
    assert isinstance(cache.ssm[0], QTensor) and cache.ssm[0].codes.dtype == torch.int8
    assert cache.conv[0].dtype == torch.int8
    stepped = torch.cat(steps, dim=1)
    assert torch.equal(stepped[:, :8], full[:, :8])
    # each step requantizes the state once (docs/numerics.md): close to, not equal to, one prefill
    assert (stepped - full).norm() / full.norm() < 0.05


def test_bad_input_names_the_value(fp_dir):
    with pytest.raises(SsmqError, match="4 heads per SSD group cannot be split into 3 head groups"):
        quantize(fp_dir, "quamba2-w8a8", rules=["layers.*.conv.x=grouped_minmax(head_groups=3)"], **CAL)
    with pytest.raises(SsmqError, match="headdim 8 cannot be split into 3 channel groups"):
        quantize(fp_dir, "quamba2-w8a8", rules=["layers.*.conv.x=grouped_minmax(channel_groups=3)"], **CAL)


def test_quamba2_w8a8_on_mamba1_points_to_quamba1(tmp_path):
    model = ssmq.build_model(tiny_config("mamba1"), seed=0)
    with pytest.raises(SsmqError, match="mamba2 models only.*use quamba1|applies to mamba2"):
        quantize(model, "quamba2-w8a8", **CAL)


# ---- scale tools ----------------------------------------------------------------------------------------


def test_scales_list_and_analyze_show_the_group_tables(tmp_path, fp_dir, stats):
    from click.testing import CliRunner

    from ssmq.cli.main import cli
    from ssmq.quant.analyze import analyze_scales

    qm = quantize(fp_dir, "quamba2-w8a8", stats=stats["quamba2-w8a8"], progress=False)
    out = save_quantized(qm, tmp_path / "q")
    layer = analyze_scales(out)["layers"][1]
    x = qm.scales["layers.1.in_proj.x"].item()
    w = qm.backbone.layers[1].mixer.conv1d.weight_scale[:64].reshape(8, 8)   # heads x channels
    conv_x = qm.scales["layers.1.conv.x"]
    for g, hg, cg in itertools.product(range(2), range(4), range(4)):
        head = g * 4 + hg                                                     # one head per head group
        wx = max(w[head, p].item() * x for p in range(cg * 2, cg * 2 + 2))   # two channels per channel group
        assert layer["groups"]["wx_scale"][g][hg][cg] == pytest.approx(wx, rel=1e-6)
        assert layer["groups"]["x_out_scale"][g][hg][cg] == pytest.approx(conv_x[g, hg, cg].item())
        assert layer["groups"]["ratio"][g][hg][cg] == pytest.approx(conv_x[g, hg, cg].item() / wx, rel=1e-5)
        assert layer["groups"]["x_scale"][g][hg][cg] == pytest.approx(x)
    listed = CliRunner().invoke(cli, ["scales", "list", str(out), "--layers", "1"])
    assert listed.exit_code == 0, listed.output
    assert "layers.1.conv.x per [SSD group, head group, channel group]" in listed.output
    analyzed = CliRunner().invoke(cli, ["scales", "analyze", str(out)])
    assert analyzed.exit_code == 0, analyzed.output
    assert "layer 1: x_scale (in_proj.x), wx_scale, x_out_scale (conv.x), x_out/wx" in analyzed.output


def test_alpha_of_quamba1_on_mamba2_sets_the_ssd_input(fp_dir, stats):
    qm = quantize(fp_dir, "quamba1", stats=stats["quamba1"], alpha=0.999, progress=False)
    for tap in ("layers.0.conv.x", "layers.1.ssm.state"):
        assert qm.scales.entry(tap).params["alpha"] == 0.999
    assert qm.scales.entry("layers.0.conv.B").observer == "minmax"
