"""`ssmq.quantize`: recipe -> transforms -> calibration statistics -> scales -> precision plan -> model.

The source model is never modified: quantization works on an fp32 copy. Static scales come from
calibration statistics (given, or collected here on the transformed model), each derived by the
observer the recipe's rules assign to its tap, and recorded with that observer and a summary of the
statistics it was derived from.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

import ssmq
from ssmq.api import load
from ssmq.data import CalibrationData, load_calibration_data
from ssmq.errors import SsmqError
from ssmq.models.checkpoint import check_output_dir, state_dict_sha256
from ssmq.models.device import parse_device
from ssmq.models.lm import MambaLM
from ssmq.quant.calibrate import calibrate, collect
from ssmq.quant.gptq import GPTQConfig, check_int4_plan, gptq_model, gptq_targets, load_gptq_weights
from ssmq.quant.gptq import provenance as gptq_provenance
from ssmq.quant.plan import build_plan, convert, scale_names
from ssmq.quant.qmodel import QuantizedMambaLM, store_float_params
from ssmq.quant.recipes import Recipe, check_arch, get_recipe
from ssmq.quant.reorder import CONV_X_OBSERVER, head_order_params
from ssmq.quant.rules import RuleSet
from ssmq.quant.scalebook import ScaleBook, ScaleEntry
from ssmq.quant.stats import CalibrationStats, check_stats_source, scale_from_stats
from ssmq.quant.transforms import apply_transforms

log = logging.getLogger(__name__)


def _fp_copy(model: str | Path | MambaLM, tokenizer: str | Path | Tokenizer | None
             ) -> tuple[MambaLM, Tokenizer | None, str]:
    """An fp32 CPU copy of the source model (never the caller's object), its tokenizer and a label."""
    if isinstance(model, MambaLM):
        if isinstance(model, QuantizedMambaLM):
            raise SsmqError("the model is already quantized; quantize its fp source instead")
        tok = tokenizer if isinstance(tokenizer, Tokenizer) or tokenizer is None else load(model, tokenizer)[1]
        return copy.deepcopy(model).float().cpu(), tok, "<in-memory model>"
    lm, tok = load(model, tokenizer=None if isinstance(tokenizer, Tokenizer) else tokenizer)
    if isinstance(lm, QuantizedMambaLM):
        raise SsmqError(f"{model}: is already a quantized checkpoint; quantize its fp source instead")
    return lm.float(), tokenizer if isinstance(tokenizer, Tokenizer) else tok, str(model)


def _scale_entries(stats: CalibrationStats, recipe: Recipe, arch: str, names: list[str]) -> dict[str, ScaleEntry]:
    entries = {}
    for name, (spec, rule) in RuleSet(list(recipe.rules)).assign(arch, names).items():
        scale, summary = scale_from_stats(stats, name, rule)
        entries[name] = ScaleEntry(value=scale, observer=spec.kind, params=dict(spec.params), stats=summary)
    return entries


def _run_gptq(fp: MambaLM, plan: dict[str, dict[str, Any]], recipe: Recipe, tok: Tokenizer | None,
              data: str | Path | None, n: int | None, seqlen: int, seed: int, device: str | torch.device,
              batch_size: int, progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """GPTQ weights for the plan's GPTQ entries (none: nothing to do), from the transformed fp model on
    the calibration documents (data, n, seqlen, seed; batch_size per forward), and their provenance."""
    targets = gptq_targets(plan)
    if not targets:
        return {}, None
    if tok is None:
        raise SsmqError("GPTQ needs calibration text and the model has no tokenizer.json; pass tokenizer=")
    docs = load_calibration_data(tok, data, n, seqlen, seed)
    config = GPTQConfig(damp=recipe.gptq_damp, group_size=recipe.group_size)
    weights = gptq_model(fp.to(parse_device(device)), docs, targets, config, batch_size, progress)
    fp.cpu()
    return weights, {**gptq_provenance(config, docs), "batch_size": batch_size}


def transform_params(fp: MambaLM, recipe: Recipe, tok: Tokenizer | None,
                     data: str | Path | CalibrationData | None = None, n: int | None = None, seqlen: int = 512,
                     seed: int = 0, batch_size: int = 1, device: str | torch.device | None = None,
                     progress: bool = True, **_: Any) -> dict[str, Any]:
    """Parameters of the recipe's data-dependent transforms, from the untransformed fp model on the
    calibration documents: reorder_heads' channel orders (from the per-channel max |x| at `conv.x`)."""
    if "reorder_heads" not in recipe.transforms:
        return {}
    if not isinstance(data, CalibrationData):
        if tok is None:
            raise SsmqError("head reordering needs calibration text and the model has no tokenizer.json; "
                            "pass tokenizer=")
        data = load_calibration_data(tok, data, n, seqlen, seed)
    names = [f"layers.{i}.conv.x" for i in range(fp.config.n_layer)]
    taps = collect(fp.to(parse_device(device)).eval(), data, {name: CONV_X_OBSERVER for name in names},
                   batch_size=batch_size, progress=progress)
    return {"reorder_heads": head_order_params([taps[name].channel_absmax for name in names], fp.config)}


def calibrate_for_recipe(model: str | Path | MambaLM, recipe: str | Recipe, *, tokenizer: str | Path | Tokenizer | None = None,
                         rules: tuple[str, ...] | list[str] = (), output: str | Path | None = None,
                         overwrite: bool = False, **kwargs: Any) -> CalibrationStats:
    """Calibration statistics of `model` as `recipe` transforms it (what `quantize --stats` needs): the
    recipe's fp-equivalent transforms are applied first, and recorded; the model sha256 recorded is
    the source model's. kwargs go to `ssmq.quant.calibrate.calibrate` (data, n, seqlen, seed,
    batch_size, device, dtype, progress)."""
    r = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if output is not None:
        check_output_dir(Path(output), overwrite)
    fp, tok, source = _fp_copy(model, tokenizer)
    r = r.with_options(rules=tuple(rules), arch=fp.config.arch)
    check_arch(r, fp.config.arch)
    source_sha = state_dict_sha256(fp)
    params = transform_params(fp, r, tok, **kwargs)
    apply_transforms(fp, r.transforms, params)
    stats = calibrate(fp, tok, rules=list(r.rules), **kwargs)
    stats.provenance["model"].update(name=source, sha256=source_sha)
    stats.provenance.update(transforms=list(r.transforms), recipe=r.name)
    if params:
        stats.provenance["transform_params"] = params
    if output is not None:
        stats.save(output, overwrite=overwrite)
    return stats


def quantize(model: str | Path | MambaLM, recipe: str = "quamba1", *, tokenizer: str | Path | Tokenizer | None = None,
             stats: str | Path | CalibrationStats | None = None, data: str | Path | None = None,
             n: int | None = None, seqlen: int = 512, seed: int = 0, alpha: float | None = None,
             rules: tuple[str, ...] | list[str] = (), quantize_embedding: bool = False,
             quantize_lm_head: bool = False, device: str | torch.device = "cpu", batch_size: int = 1,
             progress: bool = True) -> QuantizedMambaLM:
    """Quantize an fp Mamba model with a recipe. Without `stats`, calibrates on `data` (default: the
    Pile validation documents 0-255) first, `batch_size` documents per forward (1 is Quamba's setting).
    Returns the quantized model (save it with `save_quantized`)."""
    r = get_recipe(recipe)
    fp, tok, source = _fp_copy(model, tokenizer)
    cfg = fp.config
    r = r.with_options(alpha, tuple(rules), arch=cfg.arch)
    check_arch(r, cfg.arch)
    source_sha = state_dict_sha256(fp)
    plan = build_plan(cfg, r, quantize_embedding, quantize_lm_head)
    check_int4_plan(fp, plan)
    names = scale_names(plan)
    calibration: dict[str, Any] = {}
    entries: dict[str, ScaleEntry] = {}
    if stats is not None and r.activations != "static":
        raise SsmqError(f"recipe {r.name!r} has no static activation scales; it takes no calibration statistics")
    if r.activations == "static" and stats is None:
        stats = calibrate_for_recipe(fp, r, tokenizer=tok, data=data, n=n, seqlen=seqlen, seed=seed,
                                     device=device, batch_size=batch_size, progress=progress)
    if stats is not None and not isinstance(stats, CalibrationStats):
        stats = CalibrationStats.load(stats)
    apply_transforms(fp, r.transforms, stats.provenance.get("transform_params") if stats is not None else None)
    if r.activations == "static":
        check_stats_source(stats, source_sha, r.transforms, f"{source} under recipe {r.name!r}")
        for name in names:
            stats.tap(name)  # raises, naming a tap the statistics lack
        entries = _scale_entries(stats, r, cfg.arch, names)
        calibration = stats.provenance
    gptq_weights, gptq_info = _run_gptq(fp, plan, r, tok, data, n, seqlen, seed, device, batch_size, progress)
    book = ScaleBook(entries)
    convert(fp, plan, book, r.activations == "dynamic")
    load_gptq_weights(fp, gptq_weights)
    store_float_params(fp)  # remaining fp parameters: fp16, except A_log, D and the conv/dt biases (fp32)
    qc = {"ssmq_version": ssmq.__version__, "recipe": asdict(r), "transforms": list(r.transforms),
          "options": {"quantize_embedding": quantize_embedding, "quantize_lm_head": quantize_lm_head,
                      "alpha": alpha, "rules": list(rules)},
          "plan": plan, "calibration": calibration, "source_model": {"path": source, "sha256": source_sha}}
    if gptq_info is not None:
        qc["gptq"] = gptq_info
    log.info("quantized %s with recipe %s: %d scales", source, r.name, len(book))
    return QuantizedMambaLM(fp, book, qc)
