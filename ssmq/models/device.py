"""Parsing of --device and --dtype values."""

from __future__ import annotations

import torch

from ssmq.errors import SsmqError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'fp32' / 'fp16' / 'bf16' (and long names) to a torch dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise SsmqError(f"unknown dtype {value!r}; use one of fp32, fp16, bf16") from None


def parse_device(value: str | torch.device | None) -> torch.device:
    """'auto' or None picks CUDA when present, else CPU; anything else must be a valid, available device."""
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise SsmqError(f"unknown device {value!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SsmqError(f"device {value!r} requested but CUDA is not available on this machine")
    return device
