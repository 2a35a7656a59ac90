"""A description of a model directory: architecture, shapes, parameter counts, dtypes, tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ssmq.models.checkpoint import expected_tensors, load_model
from ssmq.models.registry import resolve_model_dir
from ssmq.models.tokenizer import find_tokenizer, load_tokenizer


def describe_model(model: str | Path, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Everything `ssmq info` shows, as a JSON-ready dict."""
    directory = resolve_model_dir(model)
    lm = load_model(directory)
    cfg = lm.config
    tensors = expected_tensors(lm)
    emb = tensors["backbone.embeddings.weight"].numel()
    total = sum(t.numel() for t in tensors.values())
    per_block = sum(t.numel() for k, t in tensors.items() if k.startswith("backbone.layers.0."))
    dtypes = Counter()
    for t in tensors.values():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
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
    return {
        "path": str(directory),
        "kind": "fp",
        "arch": cfg.arch,
        "shapes": shapes,
        "tie_embeddings": cfg.tie_embeddings,
        "residual_in_fp32": cfg.residual_in_fp32,
        "parameters": {"total": total, "embedding": emb, "per_block": per_block,
                       "lm_head": 0 if cfg.tie_embeddings else tensors["lm_head.weight"].numel()},
        "dtypes": dict(dtypes),
        "tokenizer": tok_info,
        "files": files,
    }
