"""Reading scales from Quamba's own checkpoint layout (built here from ssmq checkpoints and by hand)."""

import pytest
import torch
from safetensors.torch import save_file

from ssmq.quant.analyze import analyze_scales
from ssmq.quant.inspect import diff_scales, explain_scale, list_scales
from ssmq.quant.qmodel import load_quantized

from test_scales_helpers import build_checkpoint, quamba1_state, quamba2_state, run


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    ck = build_checkpoint(tmp_path_factory.mktemp("quamba"))
    ck.qm = load_quantized(ck.q)
    ck.state = quamba1_state(ck.qm)
    ck.bin_dir = ck.root / "quamba-w8a8"
    ck.bin_dir.mkdir()
    torch.save(ck.state, ck.bin_dir / "pytorch_model.bin")
    return ck


def test_quamba1_keys_map_to_ssmq_names_with_all_copies(ck):
    result = list_scales(ck.bin_dir)
    assert result["format"] == "quamba" and result["arch"] == "mamba1"
    rows = {r["name"]: r for r in result["scales"]}
    assert list(rows) == ck.qm.scales.names()
    for name, r in rows.items():
        assert r["value"] == pytest.approx(ck.qm.scales[name].item(), rel=1e-6)
        assert r["observer"] == "not recorded" and r["issues"] == []
    stored = [s.split()[0] for s in rows["layers.1.conv.out"]["stored"]]
    assert stored == [f"backbone.layers.1.mixer.{k}" for k in
                      ("conv1d.output_scale", "selective_scan.u_scale", "x_proj.a", "x_proj.alpha")]
    assert rows["layers.1.conv.out"]["quamba_key"] == "x_proj:input"
    # our checkpoint and its Quamba export hold the same values
    d = diff_scales(ck.q, ck.bin_dir)
    assert len(d["unchanged"]) == 14 and d["only_a"] == d["only_b"] == []


def test_single_file_and_ratio_only_scales(ck, tmp_path):
    state = {k: v for k, v in ck.state.items() if not k.endswith(("selective_scan.B_scale", "selective_scan.C_scale"))}
    path = tmp_path / "quamba.pt"
    torch.save(state, path)
    rows = {r["name"]: r for r in list_scales(path)["scales"]}
    for i in range(2):  # x_proj.out is stored only inside x_proj.a = conv.out / x_proj.out (and dt_proj.a)
        name = f"layers.{i}.x_proj.out"
        assert rows[name]["value"] == pytest.approx(ck.qm.scales[name].item(), rel=1e-6)
        assert [s.split()[0] for s in rows[name]["stored"]] == [
            f"backbone.layers.{i}.mixer.{k}" for k in ("x_proj.a", "x_proj.alpha", "dt_proj.a", "dt_proj.alpha")]


def test_disagreeing_copies_are_reported(ck, tmp_path):
    state = dict(ck.state)
    state["backbone.layers.0.mixer.selective_scan.u_scale"] = torch.tensor(0.5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    row = {r["name"]: r for r in list_scales(path)["scales"]}["layers.0.conv.out"]
    assert row["value"] == pytest.approx(ck.qm.scales["layers.0.conv.out"].item(), rel=1e-6)  # first copy wins
    assert any("selective_scan.u_scale = 0.5 disagrees with backbone.layers.0.mixer.conv1d.output_scale" in i
               for i in row["issues"])
    result = run("scales", "list", path)
    assert result.exit_code == 0 and "warning: layers.0.conv.out:" in result.output


def test_quamba2_grouped_scales(tmp_path):
    state = quamba2_state()
    path = tmp_path / "quamba2.safetensors"
    save_file({k: v if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in state.items()}, str(path))
    result = list_scales(path)
    assert result["arch"] == "mamba2"
    rows = {r["name"]: r for r in result["scales"]}
    x = state["backbone.layers.1.mixer.conv1d.x_out_scales"]
    assert rows["layers.1.conv.x"]["value"] == {"shape": [2, 4, 4], "min": x.min().item(), "mean": x.mean().item(),
                                                "max": x.max().item()}
    assert rows["layers.0.norm.out"]["value"] == pytest.approx(0.02)
    assert rows["layers.0.in_proj.x"]["value"] == pytest.approx(0.03)
    assert rows["layers.0.conv.x"]["consumers"] == ["SSM x (dequantize)"]
    e = explain_scale(path, "layers.0.conv.x")
    assert e["observed"]["site"].endswith("(ssmq/models/mamba2.py)")
    assert [s.split()[0] for s in e["stored"]] == ["backbone.layers.0.mixer.conv1d.x_out_scales",
                                                  "backbone.layers.0.mixer.qchunk_scan.x_scales"]
    # the per-layer conv chain with grouped output scales, and its plot
    layers = analyze_scales(path, plot=tmp_path / "a.png")["layers"]
    for i, row in enumerate(layers):
        p = f"backbone.layers.{i}.mixer.conv1d."
        wx = state[p + "wx_scale"] * state[p + "x_scale"]
        assert row["wx_scale"] == pytest.approx(wx, rel=1e-6)
        out = state[p + "x_out_scales"]
        assert row["ratio"]["shape"] == [2, 4, 4]
        assert row["ratio"]["min"] == pytest.approx(out.min().item() / wx, rel=1e-5)
        assert row["ratio"]["max"] == pytest.approx(out.max().item() / wx, rel=1e-5)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_a_checkpoint_and_stats_on_quamba_are_refused(ck, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.ones(2)}, path)
    result = run("scales", "list", path)
    assert result.exit_code == 2 and "nor a Quamba quantized state dict" in result.output
    result = run("scales", "analyze", ck.bin_dir, "--stats", ck.stats)
    assert result.exit_code == 2 and "cannot be checked" in result.output
    result = run("scales", "set", ck.bin_dir, "--scale", "layers.0.conv.out", "--value", "1", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "only ssmq checkpoints can be edited" in result.output
    assert not (tmp_path / "x").exists()
