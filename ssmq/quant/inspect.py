"""Scale observability: which logical scales a quantized model has, where each is observed, stored and
consumed (`list_scales`, `explain_scale`), and how two models' scales differ (`diff_scales`).

A model is read as a ScaleSource: an ssmq checkpoint directory (only its scales and conv weight
scales are read, not the whole model), a QuantizedMambaLM in memory, or a Quamba checkpoint
(`ssmq.quant.quamba_format`). The consumers of each scale come from the block's data flow
(`FLOWS`, written from ssmq/models/mamba1.py and mamba2.py): the module that quantizes to the scale
and every module that receives the codes and uses the scale to dequantize or requantize them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ssmq.errors import CheckpointError, SsmqError
from ssmq.models.checkpoint import SAFETENSORS
from ssmq.models.config import MambaConfig, read_config
from ssmq.models.taps import compile_pattern, layer_of, spec_of
from ssmq.quant.qmodel import QuantizedMambaLM, is_quantized_dir, read_quant_config
from ssmq.quant.quamba_format import is_quamba_state, quamba_scales, read_state
from ssmq.quant.scalebook import TENSOR_PREFIX, ScaleBook, ScaleEntry
from ssmq.quant.stats import CalibrationStats, check_stats_source


@dataclass(frozen=True)
class Use:
    """One module's use of a scale: the module (block-relative, e.g. 'mixer.x_proj', or model-level),
    the operand it reads, the action (quantize / dequantize / requantize) and what it computes."""

    module: str
    reads: str
    action: str
    how: str

    def label(self) -> str:
        short = self.module.rsplit(".", 1)[-1]
        return f"{_SHORT.get(short, short)} {self.reads} ({self.action})"


_SHORT = {"scan": "SSM", "out_rotation": "Hadamard", "norm_f": "norm_f"}


def _linear_in(module: str, out: str) -> Use:
    return Use(module, "input", "requantize",
               f"int32 accumulator · (s · weight scale), then quantized to the {out} scale")


def _produced(module: str, what: str, reads: str = "output") -> Use:
    return Use(module, reads, "quantize", f"codes = clamp(round({what} / s), -128, 127)")


_M1_SITE, _M2_SITE = "Mamba1Mixer.forward (ssmq/models/mamba1.py)", "Mamba2Mixer.forward (ssmq/models/mamba2.py)"
_BLOCK_SITE, _MODEL_SITE = "Block.forward (ssmq/models/lm.py)", "Backbone.forward (ssmq/models/lm.py)"
_SCAN_STATE = (_produced("mixer.scan", "h", "final state"),
               [Use("mixer.scan", "state (next call)", "dequantize",
                    "the int8 state in the decode cache is read back as h = s · q at the start of the next step")])
_NORM_OUT = (_produced("norm", "RMSNorm(residual)"), [_linear_in("mixer.in_proj", "in_proj output")])

# (producer, consumers, site) per tap, by architecture.
FLOWS: dict[str, dict[str, tuple[Use, list[Use], str]]] = {
    "mamba1": {
        "norm.out": (*_NORM_OUT, _BLOCK_SITE),
        "in_proj.out": (_produced("mixer.in_proj", "fp32(acc) · (s_in · s_w)"), [
            Use("mixer.conv1d", "x half", "dequantize",
                "int32 conv accumulator · (s · conv weight scale) + bias = fp32 pre-activation (conv.pre_act)"),
            Use("mixer.scan", "z half", "dequantize", "z = s · q; the scan output is gated by SiLU(z)")], _M1_SITE),
        "conv.out": (_produced("mixer.conv1d", "SiLU(pre-activation)"), [
            _linear_in("mixer.x_proj", "x_proj.out"),
            Use("mixer.scan", "u", "dequantize", "u = s · q: the SSM input and the D skip term")], _M1_SITE),
        "x_proj.out": (_produced("mixer.x_proj", "fp32(acc) · (s_in · s_w)"), [
            Use("mixer.dt_proj", "dt_low", "requantize",
                "int32 accumulator · (s · weight scale), then quantized to the dt_proj.out scale"),
            Use("mixer.scan", "B, C", "dequantize", "B = s · q and C = s · q")], _M1_SITE),
        "dt_proj.out": (_produced("mixer.dt_proj", "fp32(acc) · (s_in · s_w)"), [
            Use("mixer.scan", "delta", "dequantize", "delta = s · q, then softplus(delta + dt bias)")], _M1_SITE),
        "ssm.state": (*_SCAN_STATE, _M1_SITE),
        "out_proj.in": (_produced("mixer.out_rotation", "H · y (Hadamard-rotated scan output)"), [
            Use("mixer.out_proj", "input", "dequantize", "int32 accumulator · (s · weight scale) + bias, in fp16")],
            _M1_SITE),
    },
    "mamba2": {
        "norm.out": (*_NORM_OUT, _BLOCK_SITE),
        **{f"in_proj.{seg}": (_produced("mixer.in_proj", f"the {seg} segment of the in_proj output"), [
            Use("mixer.conv1d", f"{seg} segment", "dequantize",
                "int32 conv accumulator · (s · conv weight scale) + bias = fp32 pre-activation (conv.pre_act)")],
            _M2_SITE) for seg in ("x", "B", "C")},
        "in_proj.z": (_produced("mixer.in_proj", "the z segment of the in_proj output"), [
            Use("mixer.norm", "z", "dequantize", "z = s · q; gated RMSNorm(y) · SiLU(z)")], _M2_SITE),
        "in_proj.dt": (_produced("mixer.in_proj", "the dt segment of the in_proj output"), [
            Use("mixer.scan", "dt", "dequantize", "dt = s · q, then softplus(dt + dt bias)")], _M2_SITE),
        **{f"conv.{seg}": (_produced("mixer.conv1d", f"SiLU(pre-activation), {seg} part"), [
            Use("mixer.scan", seg, "dequantize", f"{seg} = s · q, one scale per group")], _M2_SITE)
           for seg in ("x", "B", "C")},
        "ssm.state": (*_SCAN_STATE, _M2_SITE),
        "out_proj.in": (_produced("mixer.out_rotation", "H · gated RMSNorm output"), [
            Use("mixer.out_proj", "input", "dequantize", "int32 accumulator · (s · weight scale) + bias, in fp16")],
            _M2_SITE),
    },
}
_NORM_F = (_produced("backbone.norm_f", "RMSNorm(residual)"),
           [Use("lm_head", "input", "dequantize", "int32 accumulator · (s · weight scale) = fp32 logits")],
           _MODEL_SITE)


def flow(arch: str, name: str) -> tuple[Use, list[Use], str]:
    """(producer, consumers, forward site) of a scale."""
    if name == "norm_f.out":
        return _NORM_F
    return FLOWS[arch][name.split(".", 2)[2]]


def module_path(name: str, module: str) -> str:
    """The model path of a flow module for the scale `name` ('backbone.layers.3.mixer.x_proj')."""
    layer = layer_of(name)
    return module if layer is None else f"backbone.layers.{layer}.{module}"


@dataclass
class ScaleSource:
    """The scales of one quantized model and where they are stored."""

    path: str
    format: str                                   # 'ssmq' or 'quamba'
    arch: str
    n_layer: int
    book: ScaleBook
    stored: dict[str, list[str]]
    conv_weight_scales: dict[int, torch.Tensor]   # layer -> conv weight scale of the x channels
    quant_config: dict[str, Any] = field(default_factory=dict)
    issues: dict[str, list[str]] = field(default_factory=dict)
    config: MambaConfig | None = None             # the architecture, when the source records it

    @property
    def plan(self) -> dict[str, dict[str, Any]]:
        return self.quant_config.get("plan", {})


ModelRef = str | Path | QuantizedMambaLM | ScaleSource
NOT_RECORDED = "not recorded"  # the observer of a scale read from a Quamba checkpoint


def _conv_x_part(scale: torch.Tensor, cfg: MambaConfig) -> torch.Tensor:
    """The conv weight scale of the x channels (Mamba2 convolves x|B|C; Mamba1 only x)."""
    return scale[:cfg.d_inner] if scale.numel() > 1 else scale.reshape(())


def _stored_ssmq(name: str) -> list[str]:
    return [f"{SAFETENSORS}: {TENSOR_PREFIX}{name}", f"quant_config.json: scales[{name!r}] (observer, stats, edits)"]


def _from_model(qm: QuantizedMambaLM) -> ScaleSource:
    cfg = qm.config
    weights = {}
    for i in range(cfg.n_layer):
        conv = qm.get_submodule(f"backbone.layers.{i}.mixer.conv1d")
        if hasattr(conv, "weight_scale"):
            weights[i] = _conv_x_part(conv.weight_scale.detach().float().cpu(), cfg)
    return ScaleSource("<in-memory model>", "ssmq", cfg.arch, cfg.n_layer, qm.scales,
                       {n: _stored_ssmq(n) for n in qm.scales}, weights, qm.full_quant_config(), config=cfg)


def _from_dir(directory: Path) -> ScaleSource:
    qc = read_quant_config(directory)
    cfg = read_config(directory)
    path = directory / SAFETENSORS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {SAFETENSORS}")
    weights, tensors = {}, {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.startswith(TENSOR_PREFIX):
                tensors[key] = f.get_tensor(key)
        for i in range(cfg.n_layer):
            key = f"backbone.layers.{i}.mixer.conv1d.weight_scale"
            if key in keys:
                weights[i] = _conv_x_part(f.get_tensor(key).float(), cfg)
    book = ScaleBook.from_checkpoint(tensors, qc["scales"], str(directory))
    return ScaleSource(str(directory), "ssmq", cfg.arch, cfg.n_layer, book, {n: _stored_ssmq(n) for n in book},
                       weights, qc, config=cfg)


def _from_quamba(path: Path) -> ScaleSource:
    state = read_state(path)
    if not is_quamba_state(state):
        raise CheckpointError(f"{path}: neither an ssmq quantized checkpoint (no quant_config.json) nor a Quamba "
                              "quantized state dict (no key like 'backbone.layers.N.mixer.conv1d.output_scale')")
    q = quamba_scales(state, str(path))
    book = ScaleBook({n: ScaleEntry(v, NOT_RECORDED) for n, v in q.values.items()})
    return ScaleSource(str(path), "quamba", q.arch, q.n_layer, book, q.stored, q.conv_weight_scales, issues=q.issues)


def open_scales(model: ModelRef) -> ScaleSource:
    """The scales of an ssmq quantized checkpoint directory, a QuantizedMambaLM, or a Quamba checkpoint
    (a directory with pytorch_model.bin / model.safetensors, or a .bin/.pt/.safetensors file)."""
    if isinstance(model, ScaleSource):
        return model
    if isinstance(model, QuantizedMambaLM):
        return _from_model(model)
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return _from_dir(path) if path.is_dir() and is_quantized_dir(path) else _from_quamba(path)


def check_stats(stats: CalibrationStats, source: ScaleSource) -> None:
    """Refuse statistics collected on another model, or with other transforms, than `source`."""
    if source.format != "ssmq":
        raise SsmqError(f"{source.path}: a {source.format} checkpoint does not record the model it was made from, "
                        "so statistics cannot be checked against it")
    check_stats_source(stats, source.quant_config.get("source_model", {}).get("sha256"),
                       source.quant_config.get("transforms", []), str(source.path))


def value_summary(v: torch.Tensor) -> float | dict[str, Any]:
    """A scalar as a float; a grouped scale as its shape and min / mean / max."""
    if v.numel() == 1:
        return v.item()
    return {"shape": list(v.shape), "min": v.min().item(), "mean": v.mean().item(), "max": v.max().item()}


def observer_text(observer: str, params: dict[str, Any]) -> str:
    """'percentile(α=0.9995 σ=0.01)', 'minmax'."""
    text = params_text(params)
    return f"{observer}({text})" if text else observer


def describe_observer(entry: ScaleEntry) -> str:
    """How the observer turned calibration activations into this scale."""
    p = entry.params
    if entry.observer == "percentile":
        return (f"per calibration document p = quantile(|x|, α={p.get('alpha')}); m ← p for the first document, "
                f"then m ← m + σ·(p − m) with σ={p.get('sigma')}; scale = max(m / 127, 1e-6)")
    if entry.observer == "minmax":
        per = "per channel " if p.get("per") == "channel" else ""
        groups = f"in {p['groups']} groups of contiguous channels " if p.get("groups") else ""
        return f"running max of |x| {per}{groups}over the calibration documents; scale = max(max / 127, 1e-6)"
    if entry.observer == "grouped_minmax":
        return (f"max of |x| per group (head_groups={p.get('head_groups')}, channel_groups={p.get('channel_groups')}"
                "; B, C per SSD group; state per SSD group and state index); scale = max(max / 127, 1e-6)")
    if entry.observer == NOT_RECORDED:
        return ("Quamba checkpoints do not record the observer (Quamba's default: percentile α=0.9995 for "
                "x_proj:input and ssm_state_act:input, minmax elsewhere)")
    return f"observer {entry.observer!r}"


def params_text(params: dict[str, Any]) -> str:
    """Observer parameters as 'α=0.9995 σ=0.01' (defaults that say nothing left out)."""
    symbols = {"alpha": "α", "sigma": "σ"}
    return " ".join(f"{symbols.get(k, k)}={v}" for k, v in params.items()
                    if v is not None and not (k == "per" and v == "tensor"))


def select(source: ScaleSource, layers: str | None = None, match: str | None = None) -> list[str]:
    """Scale names, optionally restricted to layers ('0-3', '1,5') and a tap pattern; errors name the options."""
    names = source.book.names()
    if layers is not None:
        regex = compile_pattern(f"layers.{layers}.*")
        chosen = {i for i in range(source.n_layer) if regex.match(f"layers.{i}.x")}
        if not chosen:
            raise SsmqError(f"--layers {layers}: no such layer; {source.path} has layers 0-{source.n_layer - 1}")
        names = [n for n in names if layer_of(n) in chosen]
    if match is not None:
        names = [n for n in source.book.match(match) if n in names]
        if not names:
            raise SsmqError(f"pattern {match!r} matches no scale in layers {layers}")
    return names


def _row(source: ScaleSource, name: str) -> dict[str, Any]:
    entry = source.book.entry(name)
    producer, consumers, _ = flow(source.arch, name)
    return {"name": name, "layer": layer_of(name), "tap": name.split(".", 2)[2] if layer_of(name) is not None else name,
            "quamba_key": spec_of(source.arch, name).quamba_key, "observer": entry.observer, "params": entry.params,
            "value": value_summary(entry.value), "producer": producer.label(),
            "groups": entry.value.tolist() if entry.value.dim() == 3 else None,  # Mamba2 [SSD grp, head grp, ch grp]
            "consumers": [u.label() for u in consumers],
            "stored": source.stored.get(name, []), "edits": len(entry.edits), "issues": source.issues.get(name, [])}


def _layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    observers: dict[str, int] = {}
    percentile: dict[str, list[int]] = {}
    for r in rows:
        observers[r["observer"]] = observers.get(r["observer"], 0) + 1
        if r["observer"] == "percentile":
            percentile.setdefault(r["tap"], []).append(r["layer"])
    where = {tap: _layer_ranges([i for i in layers if i is not None]) for tap, layers in percentile.items()}
    return {"scales": len(rows), "observers": observers, "percentile": where}


def list_scales(model: ModelRef, layers: str | None = None, match: str | None = None) -> dict[str, Any]:
    """One row per logical scale (name, layer, tap, Quamba key, observer and parameters, value,
    consumers, storage) and a summary of where percentile observers were used."""
    source = open_scales(model)
    rows = [_row(source, n) for n in select(source, layers, match)]
    return {"source": source.path, "format": source.format, "arch": source.arch, "scales": rows,
            "summary": _summary(rows)}


def _observed_note(source: ScaleSource, name: str) -> str | None:
    transforms = source.quant_config.get("transforms", [])
    if name.endswith("norm.out") and "fold_norms" in transforms:
        return "the RMSNorm weight is folded into in_proj (fold_norms): the tap sees the plain normalised activation"
    if name.endswith("out_proj.in") and "rotate_out_proj" in transforms:
        return "observed after the online Hadamard rotation (rotate_out_proj); out_proj holds W·Hᵀ"
    return None


def _use(source: ScaleSource, name: str, use: Use) -> dict[str, Any]:
    path = module_path(name, use.module)
    return {"module": path, "kind": source.plan.get(path, {}).get("kind"), "reads": use.reads, "action": use.action,
            "how": use.how}


def explain_scale(model: ModelRef, name: str) -> dict[str, Any]:
    """Where a scale is observed in the forward, the statistic that produced it, where it is stored, and
    what its producer and each consumer do with it."""
    source = open_scales(model)
    entry = source.book.entry(name)
    spec = spec_of(source.arch, name)
    producer, consumers, site = flow(source.arch, name)
    return {
        "name": name, "layer": layer_of(name), "source": source.path, "format": source.format,
        "quamba_key": spec.quamba_key, "value": value_summary(entry.value),
        "observed": {"tap": name, "site": site, "tensor": spec.tensor, "layout": spec.layout,
                     "note": _observed_note(source, name)},
        "statistic": {"observer": entry.observer, "params": entry.params, "description": describe_observer(entry),
                      "calibration": entry.stats},
        "stored": source.stored.get(name, []),
        "producer": _use(source, name, producer),
        "consumers": [_use(source, name, u) for u in consumers],
        "edits": entry.edits, "issues": source.issues.get(name, []),
    }


def _change(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The largest relative and absolute changes a -> b, each with its sign."""
    diff = b - a
    rel = diff / a
    i, j = int(rel.abs().argmax()), int(diff.abs().argmax())
    return {"rel": rel.flatten()[i].item(), "abs": diff.flatten()[j].item()}


def diff_scales(a: ModelRef, b: ModelRef) -> dict[str, Any]:
    """Per-scale change from A to B (largest relative and absolute change for grouped scales), the
    scales that did not move, and the scales present on one side only."""
    sa, sb = open_scales(a), open_scales(b)
    rows = []
    for name in (n for n in sa.book.names() if n in sb.book):
        ea, eb = sa.book.entry(name), sb.book.entry(name)
        row: dict[str, Any] = {"name": name, "a": value_summary(ea.value), "b": value_summary(eb.value)}
        if ea.value.shape != eb.value.shape:
            row["flag"] = f"shape {tuple(ea.value.shape)} -> {tuple(eb.value.shape)}"
        else:
            row.update(_change(ea.value, eb.value))
            row["flag"] = "unchanged" if torch.equal(ea.value, eb.value) else ""
        if (ea.observer, ea.params) != (eb.observer, eb.params):
            row["observer"] = f"{observer_text(ea.observer, ea.params)} -> {observer_text(eb.observer, eb.params)}"
        rows.append(row)
    return {"a": sa.path, "b": sb.path, "scales": rows,
            "unchanged": [r["name"] for r in rows if r["flag"] == "unchanged"],
            "only_a": [n for n in sa.book.names() if n not in sb.book],
            "only_b": [n for n in sb.book.names() if n not in sa.book]}
