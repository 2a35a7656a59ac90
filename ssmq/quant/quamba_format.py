"""Reading the activation scales of Quamba's own quantized checkpoints, under ssmq's scale names.

Quamba stores each logical scale several times, once per module that uses it, and some only inside
a ratio: the W8A8 linears with an int8 output keep `a = input scale / output scale` and
`alpha = a · weight scale`. For Mamba1 (Quamba), in block N (`backbone.layers.N.`):

| ssmq scale | Quamba keys |
|---|---|
| `conv.out` | `mixer.conv1d.output_scale`, `mixer.selective_scan.u_scale`, `mixer.x_proj.a` (numerator), |
| | `mixer.x_proj.alpha` (numerator) |
| `in_proj.out` | `mixer.conv1d.input_scale`, `mixer.selective_scan.z_scale`, `mixer.in_proj.a` (denominator) |
| `x_proj.out` | `mixer.selective_scan.B_scale`, `...C_scale`, `mixer.x_proj.a` (denominator), |
| | `mixer.dt_proj.a` (numerator) |
| `ssm.state` | `mixer.selective_scan.ssm_state_scale` |

and so on (`_MAMBA1`). Mamba2 (Quamba2) keeps grouped x scales `[SSD group, head group, channel
group]` in `mixer.conv1d.x_out_scales` and `mixer.qchunk_scan.x_scales` (`_MAMBA2`). A scale takes
the value of the first copy present; ratios fill in scales stored nowhere else; every other copy is
checked against it, and disagreements are reported, not hidden.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ssmq.errors import CheckpointError
from ssmq.models.checkpoint import read_state_dict

REL_TOLERANCE = 1e-5  # copies written from the same fp32 value agree to fp32 rounding


@dataclass(frozen=True)
class Ratio:
    """A key that holds num / den (times the value of `factor`, a weight scale key, when given)."""

    key: str
    num: str
    den: str
    factor: str | None = None

    def describe(self) -> str:
        extra = f" · {self.factor}" if self.factor else ""
        return f"= {self.num} / {self.den}{extra}"


# Per block: ssmq tap -> keys holding a copy of its scale (block-relative), then the ratio keys.
_MAMBA1_COPIES: dict[str, tuple[str, ...]] = {
    "norm.out": ("norm.output_scale", "mixer.in_proj.input_scale"),
    "in_proj.out": ("mixer.conv1d.input_scale", "mixer.selective_scan.z_scale"),
    "conv.out": ("mixer.conv1d.output_scale", "mixer.selective_scan.u_scale", "mixer.x_proj.input_scale"),
    "x_proj.out": ("mixer.selective_scan.B_scale", "mixer.selective_scan.C_scale"),
    "dt_proj.out": ("mixer.selective_scan.dt_scale",),
    "ssm.state": ("mixer.selective_scan.ssm_state_scale",),
    "out_proj.in": ("mixer.had.x_H_scale", "mixer.had.scale", "mixer.out_proj.a", "mixer.out_proj.input_scale"),
}
_MAMBA1_RATIOS = (
    Ratio("mixer.in_proj.a", "norm.out", "in_proj.out"),
    Ratio("mixer.in_proj.alpha", "norm.out", "in_proj.out", "mixer.in_proj.b"),
    Ratio("mixer.x_proj.a", "conv.out", "x_proj.out"),
    Ratio("mixer.x_proj.alpha", "conv.out", "x_proj.out", "mixer.x_proj.b"),
    Ratio("mixer.dt_proj.a", "x_proj.out", "dt_proj.out"),
    Ratio("mixer.dt_proj.alpha", "x_proj.out", "dt_proj.out", "mixer.dt_proj.b"),
)
_MAMBA2_COPIES: dict[str, tuple[str, ...]] = {
    "norm.out": ("norm.output_scale", "mixer.in_proj.a"),
    "in_proj.z": ("mixer.norm.z_scale", "mixer.qchunk_scan.z_scale"),
    "in_proj.x": ("mixer.conv1d.x_scale",),
    "in_proj.B": ("mixer.conv1d.B_scale",),
    "in_proj.C": ("mixer.conv1d.C_scale",),
    "in_proj.dt": ("mixer.qchunk_scan.dt_scale",),
    "conv.x": ("mixer.conv1d.x_out_scales", "mixer.qchunk_scan.x_scales"),
    "conv.B": ("mixer.conv1d.B_out_scales", "mixer.qchunk_scan.B_scale"),
    "conv.C": ("mixer.conv1d.C_out_scales", "mixer.qchunk_scan.C_scale"),
    "ssm.state": ("mixer.qchunk_scan.ssm_state_scale",),
    "out_proj.in": ("mixer.had.x_H_scale", "mixer.had.scale", "mixer.out_proj.a", "mixer.out_proj.input_scale"),
}
LAYOUTS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[Ratio, ...], str]] = {
    "mamba1": (_MAMBA1_COPIES, _MAMBA1_RATIOS, "mixer.conv1d.weight_scale"),
    "mamba2": (_MAMBA2_COPIES, (), "mixer.conv1d.wx_scale"),
}
_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.conv1d\.(output_scale|x_out_scales)$")


@dataclass
class QuambaScales:
    """The scales of a Quamba checkpoint under ssmq names, with where each is stored."""

    arch: str
    n_layer: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    stored: dict[str, list[str]] = field(default_factory=dict)      # name -> 'key (relation)'
    issues: dict[str, list[str]] = field(default_factory=dict)      # name -> disagreements between copies
    conv_weight_scales: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> conv (x part) weight scale


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float32)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        t = value.detach().float().cpu()
        return t.reshape(()) if t.numel() == 1 else t
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A Quamba state dict from a directory (pytorch_model.bin or safetensors) or a single file."""
    path = Path(path)
    if path.is_dir():
        return dict(read_state_dict(path))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        if path.suffix == ".safetensors":
            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors for a bad file
        raise CheckpointError(f"{path}: unreadable state dict ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def is_quamba_state(state: Mapping[str, Any]) -> bool:
    return any(_LAYER_KEY.match(k) for k in state)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.all((a - b).abs() <= REL_TOLERANCE * b.abs()))


def _show(t: torch.Tensor) -> str:
    return f"{t.item():.6g}" if t.numel() == 1 else f"shape {tuple(t.shape)} max {t.max().item():.6g}"


def _copies(out: QuambaScales, state: Mapping[str, Any], layer: int, copies: Mapping[str, tuple[str, ...]]) -> None:
    prefix = f"backbone.layers.{layer}."
    for tap, keys in copies.items():
        name = prefix.removeprefix("backbone.") + tap
        for key in keys:
            value = _as_tensor(state.get(prefix + key))
            if value is None:
                continue
            out.stored.setdefault(name, []).append(f"{prefix + key} (copy)")
            first = out.values.setdefault(name, value)
            if not _close(value, first):
                out.issues.setdefault(name, []).append(
                    f"{prefix + key} = {_show(value)} disagrees with {out.stored[name][0].split()[0]} = {_show(first)}")


def _ratios(out: QuambaScales, state: Mapping[str, Any], layer: int, ratios: tuple[Ratio, ...]) -> None:
    prefix = f"backbone.layers.{layer}."
    local = prefix.removeprefix("backbone.")
    for r in ratios:
        stored, factor = _as_tensor(state.get(prefix + r.key)), torch.tensor(1.0)
        if r.factor is not None:
            factor = _as_tensor(state.get(prefix + r.factor))
        if stored is None or factor is None:
            continue
        num, den = local + r.num, local + r.den
        for name in (num, den):
            out.stored.setdefault(name, []).append(f"{prefix + r.key} ({r.describe()})")
        if num in out.values and den not in out.values:
            out.values[den] = out.values[num] * factor / stored
        elif den in out.values and num not in out.values:
            out.values[num] = stored * out.values[den] / factor
        elif num in out.values and not _close(out.values[num] / out.values[den] * factor, stored):
            implied = out.values[num] / out.values[den] * factor
            for name in (num, den):
                out.issues.setdefault(name, []).append(
                    f"{prefix + r.key} = {_show(stored)} but {r.num} / {r.den} gives {_show(implied)}")


def quamba_scales(state: Mapping[str, Any], source: str) -> QuambaScales:
    """Map a Quamba state dict to ssmq scale names (see the module docstring)."""
    layers = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, state) if m})
    if not layers:
        raise CheckpointError(f"{source}: not a Quamba quantized checkpoint (no key like "
                              "'backbone.layers.N.mixer.conv1d.output_scale' or '...x_out_scales')")
    arch = "mamba2" if any(k.endswith("conv1d.x_out_scales") for k in state) else "mamba1"
    copies, ratios, weight_key = LAYOUTS[arch]
    out = QuambaScales(arch, layers[-1] + 1)
    for layer in range(out.n_layer):
        _copies(out, state, layer, copies)
        _ratios(out, state, layer, ratios)
        weight_scale = _as_tensor(state.get(f"backbone.layers.{layer}.{weight_key}"))
        if weight_scale is not None:
            out.conv_weight_scales[layer] = weight_scale
    order = {tap: i for i, tap in enumerate(copies)}
    key = lambda n: (int(n.split(".")[1]), order[n.split(".", 2)[2]])  # noqa: E731
    out.values = {n: out.values[n] for n in sorted(out.values, key=key)}
    return out
