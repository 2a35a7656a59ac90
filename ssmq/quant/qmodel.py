"""The quantized model and its checkpoint directory (DESIGN.md §5).

A QuantizedMambaLM is a MambaLM whose modules were swapped by a precision plan, plus the ScaleBook
(every logical activation scale, once) and the quant config (recipe, plan, provenance). Its
directory holds model.safetensors (int8 weights, fp params, `scales.<tap>` fp32 tensors),
config.json (the fp architecture), quant_config.json and the tokenizer. Loading is strict.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import ssmq
from ssmq.errors import CheckpointError
from ssmq.models.checkpoint import (SAFETENSORS, atomic_directory, check_state_dict, expected_tensors,
                                    read_state_dict)
from ssmq.models.config import read_config
from ssmq.models.lm import MambaLM
from ssmq.quant.plan import convert, shares_int8_table, tie_int8_table
from ssmq.quant.scalebook import TENSOR_PREFIX, ScaleBook
from ssmq.quant.transforms import HadamardRotation

# 2: packed int4 weights, grouped Mamba2 scales, fp32 A_log/D/biases, and a tied model's int8 embedding and
# lm_head stored once (as the embedding's); version 1 checkpoints still load.
FORMAT_VERSION = 2
QUANT_CONFIG = "quant_config.json"
FP32_PARAMS = ("A_log", "D", "conv1d.bias", "dt_proj.bias", "dt_bias")


def is_fp32_param(name: str) -> bool:
    """Whether a quantized model keeps this fp parameter in fp32: the per-channel ones the conv and scan
    read in fp32 (A_log, D, the conv and dt biases, docs/numerics.md 5). They are tiny, the decay
    exp(dt * A) compounds any rounding of A_log, and no cast has to run per call."""
    return any(name == s or name.endswith("." + s) for s in FP32_PARAMS)


def store_float_params(model: torch.nn.Module, others_fp16: bool = True) -> None:
    """Make the fp32 parameters (is_fp32_param) fp32 and, with others_fp16, every other fp parameter
    fp16 (norm weights, a float embedding or head). fp16 values written by older versions convert
    exactly."""
    for name, p in model.named_parameters():
        if is_fp32_param(name):
            p.data = p.data.float()
        elif others_fp16:
            p.data = p.data.half()


class QuantizedMambaLM(MambaLM):
    """A MambaLM running a precision plan, with its scales (`qm.scales["layers.3.conv.out"]`)."""

    def __init__(self, model: MambaLM, scales: ScaleBook, quant_config: dict[str, Any]):
        torch.nn.Module.__init__(self)
        self.config, self.taps = model.config, model.taps
        self.backbone, self.lm_head = model.backbone, model.lm_head
        self.scales = scales
        self.quant_config = quant_config

    @contextmanager
    def override_scales(self, values: Mapping[str, torch.Tensor | float]) -> Iterator[QuantizedMambaLM]:
        """Temporarily use other scale values (A/B evaluation without writing files)."""
        with self.scales.override(values):
            yield self

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedMambaLM:
        """.to() / .cuda() / .half() apply to the modules as usual, a shared int8 table stays shared, and the
        scale book follows the model to its device (and stays fp32), so scales are read there without a
        copy per call."""
        head, emb = self.lm_head, self.backbone.embeddings
        shared = [n for n in ("weight", "weight_scale")
                  if n in head._buffers and head._buffers[n] is not None and head._buffers[n] is emb._buffers.get(n)]
        super()._apply(fn, recurse)
        for name in shared:  # buffers are converted per module: keep a shared int8 table one tensor
            setattr(head, name, getattr(emb, name))
        if getattr(self, "scales", None) is not None:
            self.scales.to(self.device)
        return self

    def full_quant_config(self) -> dict[str, Any]:
        """quant_config.json as it would be written now (current scale provenance included)."""
        return {**self.quant_config, "format_version": FORMAT_VERSION, "scales": self.scales.metadata()}


def is_quantized_dir(directory: Path) -> bool:
    return (Path(directory) / QUANT_CONFIG).is_file()


def save_quantized(qm: QuantizedMambaLM, directory: Path, tokenizer_file: Path | None = None,
                   overwrite: bool = False) -> Path:
    """Write the quantized checkpoint directory atomically."""
    with atomic_directory(Path(directory), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(qm.config.to_transformers(), indent=2) + "\n")
        (tmp / QUANT_CONFIG).write_text(json.dumps(qm.full_quant_config(), indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in expected_tensors(qm).items()}
        tensors.update(qm.scales.tensors())
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "ssmq-quantized"})
        if tokenizer_file is not None:
            (tmp / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    return Path(directory)


def read_quant_config(directory: Path) -> dict[str, Any]:
    """quant_config.json, with the format version checked."""
    path = Path(directory) / QUANT_CONFIG
    try:
        qc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable quant config ({exc})") from None
    version = qc.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: missing or malformed 'format_version'")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} was written by a newer ssmq; this ssmq "
                              f"({ssmq.__version__}) reads format versions up to {FORMAT_VERSION}")
    for key in ("plan", "scales", "recipe"):
        if key not in qc:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return qc


def load_quantized(directory: Path, device: str | torch.device = "cpu") -> QuantizedMambaLM:
    """Rebuild a quantized model from its directory; a missing or extra tensor or scale is an error naming it."""
    directory = Path(directory)
    qc = read_quant_config(directory)
    cfg = read_config(directory)
    tensors = read_state_dict(directory)
    scales = ScaleBook.from_checkpoint(tensors, qc["scales"], str(directory))
    with torch.device("meta"):
        model = MambaLM(cfg)
    if "rotate_out_proj" in qc.get("transforms", []):
        for block in model.backbone.layers:
            block.mixer.out_rotation = HadamardRotation(cfg.d_inner)
    convert(model, qc["plan"], scales, qc["recipe"]["activations"] == "dynamic", from_float=False)
    weights = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
    shared = shares_int8_table(qc["plan"], cfg)
    if shared and "lm_head.weight" in weights:  # written before the tied int8 table was shared: its own copy
        model.lm_head.weight = torch.empty_like(model.lm_head.weight)
        model.lm_head.weight_scale = torch.empty_like(model.lm_head.weight_scale)
        shared = False
    expected = expected_tensors(model)
    check_state_dict(expected, weights, str(directory))
    model.load_state_dict(weights, strict=False, assign=True)
    if shared:
        tie_int8_table(model)
    elif model.lm_head.weight.device.type == "meta":  # still tied to the embedding
        model.lm_head.weight = model.backbone.embeddings.weight
    store_float_params(model, others_fp16=False)
    qc.pop("format_version", None)
    qc.pop("scales", None)
    return QuantizedMambaLM(model, scales, qc).to(device).eval()
