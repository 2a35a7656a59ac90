"""A description of a model directory: architecture, shapes, parameter counts, dtypes, tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ssmq.models.checkpoint import expected_tensors, load_model
from ssmq.models.registry import resolve_model_dir
from ssmq.models.tokenizer import find_tokenizer, load_tokenizer


def describe_model(model: str | Path, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Everything `ssmq info` shows, as a JSON-ready dict (fp models and quantized checkpoints)."""
    from ssmq.quant.qmodel import is_quantized_dir, load_quantized  # quant sits above models

    directory = resolve_model_dir(model)
    quantized = is_quantized_dir(directory)
    lm = load_quantized(directory) if quantized else load_model(directory)
    cfg = lm.config
    tensors = expected_tensors(lm)
    emb = tensors["backbone.embeddings.weight"].numel()
    total = sum(t.numel() for t in tensors.values())
    per_block = sum(t.numel() for k, t in tensors.items() if k.startswith("backbone.layers.0."))
    dtypes: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for t in tensors.values():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
        nbytes[str(t.dtype).replace("torch.", "")] += t.numel() * t.element_size()
    shapes = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "d_inner": cfg.d_inner,
              "d_state": cfg.d_state, "d_conv": cfg.d_conv}
    if cfg.arch == "mamba1":
        shapes["dt_rank"] = cfg.dt_rank
    else:
        shapes.update(nheads=cfg.nheads, headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size)
    tok_path = find_tokenizer(directory, Path(tokenizer) if tokenizer else None)
    tok_info = None
    if tok_path is not None:
        tok = load_tokenizer(tok_path)
        tok_info = {"path": str(tok_path), "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    described = {
        "path": str(directory),
        "kind": "quantized" if quantized else "fp",
        "arch": cfg.arch,
        "shapes": shapes,
        "tie_embeddings": cfg.tie_embeddings,
        "residual_in_fp32": cfg.residual_in_fp32,
        "parameters": {"total": total, "embedding": emb, "per_block": per_block,
                       "lm_head": 0 if cfg.tie_embeddings else tensors["lm_head.weight"].numel()},
        "dtypes": dict(dtypes),
        "tensor_bytes": dict(nbytes),
        "tokenizer": tok_info,
        "files": files,
    }
    if quantized:
        qc = lm.quant_config
        kinds = Counter(spec["kind"] for spec in qc["plan"].values())
        described["quantization"] = {
            "recipe": qc["recipe"]["name"], "activations": qc["recipe"]["activations"],
            "weight_granularity": qc["recipe"]["weight_granularity"], "transforms": qc.get("transforms", []),
            "options": qc.get("options", {}), "modules": dict(kinds), "scales": len(lm.scales),
            "calibration": qc.get("calibration", {}), "source_model": qc.get("source_model", {}),
            "ssmq_version": qc.get("ssmq_version")}
    return described
