"""Builders shared by the test_scales_* modules (this module has no tests): a tiny quantized checkpoint
with the calibration statistics it was made from, and Quamba-layout state dicts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from click.testing import CliRunner

import ssmq
from ssmq.cli.main import cli
from ssmq.models.tokenizer import load_tokenizer
from ssmq.quant.qmodel import save_quantized
from ssmq.quant.quantize import calibrate_for_recipe, quantize
from ssmq.quant.transforms import apply_transforms

from conftest import NEOX_TOKENIZER

CAL = dict(n=3, seqlen=32, progress=False)


def build_fp(root: Path, seed: int = 2) -> Path:
    """A tiny random Mamba1 model with the GPT-NeoX vocabulary and tokenizer, saved in `root`/fp."""
    cfg = ssmq.MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=50280, d_state=8)
    return ssmq.save(ssmq.build_model(cfg, seed=seed), root / "fp", tokenizer=NEOX_TOKENIZER)


def build_checkpoint(root: Path, seed: int = 2) -> SimpleNamespace:
    """fp model -> quamba1 statistics -> quantized checkpoint, all under `root`."""
    fp = build_fp(root, seed)
    stats = calibrate_for_recipe(fp, "quamba1", output=root / "stats", **CAL)
    qm = quantize(fp, "quamba1", stats=stats, progress=False)
    q = save_quantized(qm, root / "q", NEOX_TOKENIZER)
    return SimpleNamespace(fp=fp, stats=root / "stats", q=q, root=root)


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def quamba1_state(qm: ssmq.MambaLM) -> dict:
    """A Quamba (Mamba1 W8A8) state dict holding the scales of an ssmq quantized model, laid out as
    Quamba saves them: python floats for conv1d / norm / Hadamard, (1, 1) tensors for the linears'
    a = input / output scale and b = weight scale, 0-d buffers for the selective scan."""
    s = {name: float(v) for name, v in qm.scales.tensors().items()}
    state = {}
    for i in range(qm.config.n_layer):
        p, sc = f"backbone.layers.{i}.", lambda tap: s[f"scales.layers.{i}.{tap}"]  # noqa: E731
        conv = qm.backbone.layers[i].mixer.conv1d
        state[p + "norm.weight"] = torch.ones(qm.config.d_model, dtype=torch.float16)
        state[p + "norm.output_scale"] = sc("norm.out")
        state[p + "mixer.conv1d.weight"] = conv.weight[:, 0].clone()
        state[p + "mixer.conv1d.weight_scale"] = float(conv.weight_scale)
        state[p + "mixer.conv1d.input_scale"] = sc("in_proj.out")
        state[p + "mixer.conv1d.output_scale"] = sc("conv.out")
        for lin, (inp, out) in {"in_proj": ("norm.out", "in_proj.out"), "x_proj": ("conv.out", "x_proj.out"),
                                "dt_proj": ("x_proj.out", "dt_proj.out")}.items():
            w = float(getattr(qm.backbone.layers[i].mixer, lin).weight_scale)
            state[p + f"mixer.{lin}.a"] = torch.tensor([[sc(inp) / sc(out)]])
            state[p + f"mixer.{lin}.b"] = torch.tensor([[w]])
            state[p + f"mixer.{lin}.alpha"] = w * sc(inp) / sc(out)
        for buf, tap in (("u_scale", "conv.out"), ("dt_scale", "dt_proj.out"), ("B_scale", "x_proj.out"),
                         ("C_scale", "x_proj.out"), ("z_scale", "in_proj.out"), ("ssm_state_scale", "ssm.state")):
            state[p + f"mixer.selective_scan.{buf}"] = torch.tensor(sc(tap))
        state[p + "mixer.had.x_H_scale"] = sc("out_proj.in")
        state[p + "mixer.out_proj.a"] = torch.tensor([[sc("out_proj.in")]])
    return state


def quamba2_state(n_layer: int = 2, groups: int = 2, seed: int = 0) -> dict:
    """A Quamba2 (Mamba2) state dict with grouped conv output scales x [G, 4, 4], B and C [G]."""
    g = torch.Generator().manual_seed(seed)

    def pos(*shape):
        return torch.rand(*shape, generator=g) * 0.05 + 0.005

    state = {}
    for i in range(n_layer):
        p = f"backbone.layers.{i}.mixer."
        x_out = pos(groups, 4, 4)
        state.update({
            p + "in_proj.a": torch.tensor([[0.02 + i / 100]]), p + "conv1d.x_scale": 0.03 + i / 100,
            p + "conv1d.B_scale": 0.04, p + "conv1d.C_scale": 0.05, p + "conv1d.wx_scale": 0.002 * (i + 1),
            p + "conv1d.wB_scale": 0.003, p + "conv1d.wC_scale": 0.004,
            p + "conv1d.x_out_scales": x_out, p + "qchunk_scan.x_scales": x_out.clone(),
            p + "conv1d.B_out_scales": pos(groups), p + "conv1d.C_out_scales": pos(groups),
            p + "qchunk_scan.dt_scale": torch.tensor(0.01), p + "qchunk_scan.ssm_state_scale": pos(groups, 4, 4, 8),
            p + "norm.z_scale": 0.02, p + "had.x_H_scale": 0.004,
        })
        state[p + "qchunk_scan.B_scale"] = state[p + "conv1d.B_out_scales"].clone()
        state[p + "qchunk_scan.C_scale"] = state[p + "conv1d.C_out_scales"].clone()
    return state


def calibration_docs(stats_dir: Path) -> list[list[int]]:
    """The token ids of the documents a statistics directory was collected on (from its provenance)."""
    data = json.loads((Path(stats_dir) / "stats.json").read_text())["provenance"]["data"]
    texts = [json.loads(line)["text"] for line in Path(data["file"]).read_text().splitlines() if line.strip()]
    tok = load_tokenizer(NEOX_TOKENIZER)
    return [tok.encode(texts[i]).ids[:data["seqlen"]] for i in data["indices"]]


@torch.no_grad()
def per_document_abs_values(fp_dir: Path, docs: list[list[int]], taps: list[str]) -> dict[str, list[np.ndarray]]:
    """|x| at each tap of the quamba1-transformed fp model, one flat float64 array per document."""
    model, _ = ssmq.load(fp_dir)
    apply_transforms(model, ["fold_norms", "rotate_out_proj"])
    out: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    hook = lambda name, x: out[name].append(x.abs().double().flatten().numpy())  # noqa: E731
    handles = [model.taps.add(t, hook) for t in taps]
    for ids in docs:
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return out


def percentile_scale(samples: list[np.ndarray], alpha: float, sigma: float = 0.01) -> float:
    """Quamba's percentile observer, written out: per document numpy quantile, EMA, / 127."""
    m = None
    for x in samples:
        p = float(np.quantile(x, alpha))
        m = p if m is None else m + sigma * (p - m)
    return max(m / 127, 1e-6)
