"""Precision plans: for each module of a model, how it is represented — data, not code paths.

A plan maps module paths (`backbone.layers.3.mixer.conv1d`) to a spec: the quantized module kind
and the tap scales it writes. `convert` swaps the modules of a model accordingly, either from the fp
weights (quantization) or as empty shells of the right shapes (loading a checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig
from ssmq.models.lm import MambaLM
from ssmq.quant.modules import (ActQuant, QuantCausalConv1d, QuantEmbedding, QuantHadamard, QuantRMSNorm,
                                QuantSelectiveScan, W8A8DeltaProjection, W8A8Linear)
from ssmq.quant.recipes import Recipe
from ssmq.quant.scalebook import ScaleBook

Plan = dict[str, dict[str, Any]]


def build_plan(cfg: MambaConfig, recipe: Recipe, quantize_embedding: bool, quantize_lm_head: bool) -> Plan:
    """The plan a recipe gives a model of shape `cfg` (Mamba1 W8A8)."""
    per_channel = recipe.weight_granularity == "channel"
    plan: Plan = {}
    for i in range(cfg.n_layer):
        tap, mod = f"layers.{i}.", f"backbone.layers.{i}."
        plan[mod + "norm"] = {"kind": "rmsnorm_q8", "out": tap + "norm.out"}
        plan[mod + "mixer.in_proj"] = {"kind": "w8a8_linear", "out": tap + "in_proj.out", "per_channel": per_channel}
        plan[mod + "mixer.conv1d"] = {"kind": "conv1d_silu_q8", "out": tap + "conv.out", "per_channel": per_channel}
        plan[mod + "mixer.x_proj"] = {"kind": "w8a8_linear", "out": tap + "x_proj.out", "per_channel": per_channel}
        plan[mod + "mixer.dt_proj"] = {"kind": "w8a8_delta", "out": tap + "dt_proj.out", "per_channel": per_channel}
        plan[mod + "mixer.scan"] = {"kind": "selective_scan_q8", "state": tap + "ssm.state"}
        plan[mod + "mixer.out_rotation"] = {"kind": "hadamard_q8", "rotate": recipe.rotate_out_proj,
                                            "out": tap + "out_proj.in"}
        plan[mod + "mixer.out_proj"] = {"kind": "w8a8_linear", "out": None, "per_channel": per_channel}
    if quantize_embedding:
        plan["backbone.embeddings"] = {"kind": "embedding_q8"}
    if quantize_lm_head:
        plan["backbone.norm_f"] = {"kind": "rmsnorm_q8", "out": "norm_f.out"}
        plan["lm_head"] = {"kind": "w8a8_linear", "out": None, "per_channel": True}
    return plan


def scale_names(plan: Plan) -> list[str]:
    """Every activation scale the plan writes, in forward order."""
    names = []
    for spec in plan.values():
        for key in ("out", "state"):
            if spec.get(key):
                names.append(spec[key])
    return names


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    try:
        return model.get_submodule(parent_path), attr
    except AttributeError:
        raise SsmqError(f"precision plan names module {path!r}, which the model does not have") from None


def _make(spec: dict[str, Any], fp: nn.Module, book: ScaleBook, dynamic: bool, model: MambaLM,
          path: str, from_float: bool) -> nn.Module:
    def act(name: str | None) -> ActQuant | None:
        if name is None:
            return None
        return ActQuant(None if dynamic else book, None if dynamic else name)

    kind = spec["kind"]
    fallback = ActQuant(None, None)
    if kind == "rmsnorm_q8":
        q = QuantRMSNorm(fp.weight.shape[0], fp.eps, act(spec["out"]))
        if from_float:
            q.weight = nn.Parameter(fp.weight.detach().float().clone())
        return q
    if kind in ("w8a8_linear", "w8a8_delta"):
        weight = fp.weight
        bias = getattr(fp, "bias", None)
        cls = W8A8DeltaProjection if kind == "w8a8_delta" else W8A8Linear
        q = cls(weight.shape[1], weight.shape[0], bias is not None, spec["per_channel"], fallback, act(spec["out"]))
        return q.load_float(weight, bias) if from_float else q
    if kind == "conv1d_silu_q8":
        layer = int(path.split(".")[2])
        q = QuantCausalConv1d(fp.weight.shape[0], fp.weight.shape[2], fp.bias is not None, spec["per_channel"],
                              act(spec["out"]), model.taps, f"layers.{layer}.")
        return q.load_float(fp.weight, fp.bias) if from_float else q
    if kind == "selective_scan_q8":
        return QuantSelectiveScan(act(spec["state"]), fallback)
    if kind == "hadamard_q8":
        return QuantHadamard(spec["rotate"], act(spec["out"]))
    if kind == "embedding_q8":
        q = QuantEmbedding(*fp.weight.shape)
        return q.load_float(fp.weight) if from_float else q
    raise SsmqError(f"precision plan entry {path!r} has unknown kind {kind!r}")


def convert(model: MambaLM, plan: Plan, book: ScaleBook, dynamic: bool, from_float: bool = True) -> MambaLM:
    """Swap the modules named by `plan` in place. With from_float the int8 weights are computed from the
    fp weights; otherwise the new modules are empty shells to be filled by a checkpoint."""
    if "lm_head" in plan and model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for path, spec in plan.items():
        parent, attr = _resolve(model, path)
        with torch.device("cpu" if from_float else "meta"):
            setattr(parent, attr, _make(spec, getattr(parent, attr), book, dynamic, model, path, from_float))
    return model
