"""The Python API twins of the CLI commands that load and save models."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from ssmq.models.checkpoint import load_model, save_model
from ssmq.models.device import parse_device, parse_dtype
from ssmq.models.lm import MambaLM
from ssmq.models.registry import resolve_model_dir
from ssmq.models.tokenizer import check_vocab_fits, find_tokenizer, load_tokenizer
from ssmq.quant.qmodel import is_quantized_dir, load_quantized


def load(model: str | Path, tokenizer: str | Path | None = None, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype | None = None) -> tuple[MambaLM, Tokenizer | None]:
    """Load a model directory, quantized checkpoint or built-in name, with its tokenizer (None when
    there is none). The tokenizer is `tokenizer` if given, else `tokenizer.json` in the directory.
    `dtype` applies to fp models; a quantized model keeps the representation its plan gives it."""
    directory = resolve_model_dir(model)
    if is_quantized_dir(directory):
        lm: MambaLM = load_quantized(directory, parse_device(device))
    else:
        lm = load_model(directory, parse_device(device), parse_dtype(dtype))
    tok_path = find_tokenizer(directory, Path(tokenizer) if tokenizer is not None else None)
    tok = None
    if tok_path is not None:
        tok = load_tokenizer(tok_path)
        check_vocab_fits(tok, lm.config.vocab_size, str(tok_path))
    return lm, tok


def save(model: MambaLM, directory: str | Path, tokenizer: str | Path | None = None,
         overwrite: bool = False) -> Path:
    """Write an fp model in the transformers layout (config.json, model.safetensors, tokenizer.json)."""
    return save_model(model, Path(directory), Path(tokenizer) if tokenizer is not None else None, overwrite)
