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
from ssmq.quant.int4_modules import Int4Embedding, W4A8Linear, W4A16Linear
from ssmq.quant.mamba2_modules import QuantGatedRMSNorm, QuantSSDScan, SegmentQuant
from ssmq.quant.modules import (ActQuant, QuantCausalConv1d, QuantEmbedding, QuantHadamard, QuantRMSNorm,
                                QuantSelectiveScan, W8A8DeltaProjection, W8A8Linear)
from ssmq.quant.recipes import Recipe
from ssmq.quant.scalebook import ScaleBook

Plan = dict[str, dict[str, Any]]


def linear_spec(recipe: Recipe, out: str | None, per_channel: bool, gptq: bool) -> dict[str, Any]:
    """The plan entry of a linear layer in the recipe's weight format: W8A8 (int8 weights), W4A8 or W4A16
    (packed int4, group-wise; `gptq` says whether GPTQ chooses the codes, else round to nearest)."""
    if recipe.weight_bits == 8:
        return {"kind": "w8a8_linear", "out": out, "per_channel": per_channel}
    if recipe.activations == "none":
        return {"kind": "w4a16_linear", "group_size": recipe.group_size, "gptq": gptq}
    return {"kind": "w4a8_linear", "out": out, "group_size": recipe.group_size, "gptq": gptq}


def embedding_spec(recipe: Recipe) -> dict[str, Any]:
    """The plan entry of the embedding: int8 rows (8-bit recipes) or int4 rows with group scales."""
    if recipe.weight_bits == 8:
        return {"kind": "embedding_q8"}
    return {"kind": "embedding_q4", "group_size": recipe.group_size}


def weight_only_plan(cfg: MambaConfig, recipe: Recipe, quantize_embedding: bool, quantize_lm_head: bool) -> Plan:
    """W4A16 (any architecture): int4 in_proj and out_proj (GPTQ), x_proj (Mamba1, round to nearest), and
    optionally embedding and lm_head; every activation stays in floating point."""
    plan: Plan = {}
    for i in range(cfg.n_layer):
        mod = f"backbone.layers.{i}.mixer."
        plan[mod + "in_proj"] = linear_spec(recipe, None, True, gptq=True)
        if cfg.arch == "mamba1":
            plan[mod + "x_proj"] = linear_spec(recipe, None, True, gptq=False)
        plan[mod + "out_proj"] = linear_spec(recipe, None, True, gptq=True)
    if quantize_embedding:
        plan["backbone.embeddings"] = embedding_spec(recipe)
    if quantize_lm_head:
        plan["lm_head"] = linear_spec(recipe, None, True, gptq=True)
    return plan


def mamba2_block_plan(cfg: MambaConfig, recipe: Recipe, layer: int, per_channel: bool) -> Plan:
    """One Mamba2 block with static int8 activations: each in_proj segment (z, x, B, C, dt) and conv output
    segment (x, B, C) quantized to its own scale (grouped or per tensor, as the recipe's rules say), the
    int8 SSD scan, the gated norm on int8 z, Hadamard + quantization before out_proj. The linear layers'
    weights are the recipe's (linear_spec)."""
    tap, mod = f"layers.{layer}.", f"backbone.layers.{layer}."
    conv = [tap + "conv.x", tap + "conv.B", tap + "conv.C"]
    return {
        mod + "norm": {"kind": "rmsnorm_q8", "out": tap + "norm.out"},
        mod + "mixer.in_proj": linear_spec(recipe, [tap + f"in_proj.{s}" for s in ("z", "x", "B", "C", "dt")],
                                           per_channel, gptq=True),
        mod + "mixer.conv1d": {"kind": "conv1d_silu_q8", "out": conv, "per_channel": per_channel},
        mod + "mixer.scan": {"kind": "ssd_scan_q8", "inputs": conv, "state": tap + "ssm.state"},
        mod + "mixer.norm": {"kind": "gated_rmsnorm_z8"},
        mod + "mixer.out_rotation": {"kind": "hadamard_q8", "rotate": recipe.rotate_out_proj,
                                     "out": tap + "out_proj.in"},
        mod + "mixer.out_proj": linear_spec(recipe, None, per_channel, gptq=True),
    }


def build_plan(cfg: MambaConfig, recipe: Recipe, quantize_embedding: bool, quantize_lm_head: bool) -> Plan:
    """The plan a recipe gives a model of shape `cfg` (Mamba1 W8A8 or W4A8; weight-only W4A16)."""
    if recipe.activations == "none":
        return weight_only_plan(cfg, recipe, quantize_embedding, quantize_lm_head)
    per_channel = recipe.weight_granularity == "channel"
    plan: Plan = {}
    for i in range(cfg.n_layer):
        tap, mod = f"layers.{i}.", f"backbone.layers.{i}."
        if cfg.arch == "mamba2":
            plan.update(mamba2_block_plan(cfg, recipe, i, per_channel))
            continue
        plan[mod + "norm"] = {"kind": "rmsnorm_q8", "out": tap + "norm.out"}
        plan[mod + "mixer.in_proj"] = linear_spec(recipe, tap + "in_proj.out", per_channel, gptq=True)
        plan[mod + "mixer.conv1d"] = {"kind": "conv1d_silu_q8", "out": tap + "conv.out", "per_channel": per_channel}
        plan[mod + "mixer.x_proj"] = linear_spec(recipe, tap + "x_proj.out", per_channel, gptq=False)
        # dt_proj stays int8 in every recipe (its K = dt_rank is not a multiple of the int4 group size on every model)
        plan[mod + "mixer.dt_proj"] = {"kind": "w8a8_delta", "out": tap + "dt_proj.out", "per_channel": per_channel}
        plan[mod + "mixer.scan"] = {"kind": "selective_scan_q8", "state": tap + "ssm.state"}
        plan[mod + "mixer.out_rotation"] = {"kind": "hadamard_q8", "rotate": recipe.rotate_out_proj,
                                            "out": tap + "out_proj.in"}
        plan[mod + "mixer.out_proj"] = linear_spec(recipe, None, per_channel, gptq=True)
    if quantize_embedding:
        plan["backbone.embeddings"] = embedding_spec(recipe)
    if quantize_lm_head:
        plan["backbone.norm_f"] = {"kind": "rmsnorm_q8", "out": "norm_f.out"}
        plan["lm_head"] = linear_spec(recipe, None, True, gptq=True)
    return plan


def scale_names(plan: Plan) -> list[str]:
    """Every activation scale the plan writes, in forward order."""
    names = []
    for spec in plan.values():
        for key in ("out", "state"):
            value = spec.get(key)
            if value:
                names.extend(value if isinstance(value, list) else [value])  # a list: one scale per segment
    return names


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    try:
        return model.get_submodule(parent_path), attr
    except AttributeError:
        raise SsmqError(f"precision plan names module {path!r}, which the model does not have") from None


def _make(spec: dict[str, Any], fp: nn.Module, book: ScaleBook, dynamic: bool, model: MambaLM,
          path: str, from_float: bool) -> nn.Module:
    def act(name: str | list[str] | None) -> ActQuant | None:
        if name is None:
            return None
        if isinstance(name, list):  # an output of several segments, each with its own static scale
            if dynamic:
                raise SsmqError(f"precision plan entry {path!r}: segment scales need static activations")
            return SegmentQuant(book, name, model.config)
        return ActQuant(None if dynamic else book, None if dynamic else name)

    kind = spec["kind"]
    fallback = ActQuant(None, None)
    if kind == "rmsnorm_q8":
        q = QuantRMSNorm(fp.weight.shape[0], fp.eps, act(spec["out"]), fp.residual_in_fp32)
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
    if kind == "ssd_scan_q8":
        x, B, C = spec["inputs"]
        return QuantSSDScan(fp.chunk_size, fp.dt_limit, book, x, B, C, spec["state"], model.config)
    if kind == "gated_rmsnorm_z8":
        q = QuantGatedRMSNorm(fp.weight.shape[0], fp.eps, fp.group_size)
        if from_float:
            q.weight = nn.Parameter(fp.weight.detach().float().clone())
        return q
    if kind == "hadamard_q8":
        return QuantHadamard(spec["rotate"], act(spec["out"]))
    if kind == "embedding_q8":
        q = QuantEmbedding(*fp.weight.shape)
        return q.load_float(fp.weight) if from_float else q
    if kind in ("w4a16_linear", "w4a8_linear"):
        weight, bias = fp.weight, getattr(fp, "bias", None)
        shape = (weight.shape[1], weight.shape[0], bias is not None, spec["group_size"])
        q = (W4A16Linear(*shape, name=path) if kind == "w4a16_linear"
             else W4A8Linear(*shape, fallback, act(spec["out"]), name=path))
        return q.load_float(weight, bias) if from_float else q
    if kind == "embedding_q4":
        q = Int4Embedding(*fp.weight.shape, spec["group_size"], name=path)
        return q.load_float(fp.weight) if from_float else q
    raise SsmqError(f"precision plan entry {path!r} has unknown kind {kind!r}")


def shares_int8_table(plan: Plan, cfg: MambaConfig) -> bool:
    """Whether the plan's int8 embedding and W8A8 lm_head are one table: with tied embeddings both are the
    same per-row abs-max codes and row scales of the same weights (docs/numerics.md 4.7), so the model
    holds, and a checkpoint stores, them once (as the embedding's)."""
    head = plan.get("lm_head", {})
    return (cfg.tie_embeddings and plan.get("backbone.embeddings", {}).get("kind") == "embedding_q8"
            and head.get("kind") == "w8a8_linear" and bool(head.get("per_channel")))


def tie_int8_table(model: MambaLM) -> None:
    """Point lm_head's codes and row scales at the embedding's (one buffer each)."""
    emb, head = model.backbone.embeddings, model.lm_head
    head.weight, head.weight_scale = emb.weight, emb.weight_scale


def convert(model: MambaLM, plan: Plan, book: ScaleBook, dynamic: bool, from_float: bool = True) -> MambaLM:
    """Swap the modules named by `plan` in place. With from_float the int8 weights are computed from the
    fp weights; otherwise the new modules are empty shells to be filled by a checkpoint."""
    if "lm_head" in plan and model.config.tie_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for path, spec in plan.items():
        parent, attr = _resolve(model, path)
        with torch.device("cpu" if from_float else "meta"):
            setattr(parent, attr, _make(spec, getattr(parent, attr), book, dynamic, model, path, from_float))
    if shares_int8_table(plan, model.config):
        tie_int8_table(model)
    return model
