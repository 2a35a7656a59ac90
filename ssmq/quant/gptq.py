"""GPTQ for 4-bit weights: quantize a linear layer's columns one at a time, feeding each column's
rounding error forward through the inverse Hessian of its inputs (Frantar et al., 2022).

For a layer y = x Wᵀ with calibration inputs X, H = XᵀX / tokens. With the damped H
(+ damp · mean(diag H) · I), its inverse's upper Cholesky factor U gives, for column k, the error
update: w[:, k+1:] -= (w[:, k] - ŵ[:, k]) / U[k, k] · U[k, k+1:]. Columns are processed in blocks of
`block_size` (the update to later blocks is applied lazily, once per block). A group's scale is set when
its first column is reached, from the weights as updated so far (docs/numerics.md §7.6).

Hessians come from the named taps: in_proj reads `layers.{i}.norm.out`, out_proj `layers.{i}.out_proj.in`
and lm_head `norm_f.out`. They are all collected in one forward pass of the (transformed) fp model over
the calibration documents, so GPTQ is **not sequential**: every layer sees the fp model's inputs, not
those of already-quantized earlier layers. The result is deterministic for the same model, data and
device (the data are chosen by a seed; GPTQ itself has no randomness).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from ssmq.data import CalibrationData
from ssmq.errors import SsmqError
from ssmq.models.lm import MambaLM
from ssmq.ops.int4 import (DEFAULT_GROUP_SIZE, GROUP_SCALE_DTYPE, expand_groups, group_scales_from_amax,
                           group_size_for, integer_group_scales, quantize_int4, quantize_int4_two_level,
                           round_to_int4, two_level_channel_scale)

log = logging.getLogger(__name__)

W4A16, W4A8 = "w4a16", "w4a8"

# module path suffix -> the tap that sees its input
INPUT_TAPS = {"mixer.in_proj": "norm.out", "mixer.out_proj": "out_proj.in"}


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings: damping as a fraction of the mean Hessian diagonal, group and block sizes."""

    damp: float = 0.01
    group_size: int = DEFAULT_GROUP_SIZE
    block_size: int = 128

    def __post_init__(self) -> None:
        if not (math.isfinite(self.damp) and 0 < self.damp <= 1):
            raise SsmqError(f"GPTQ damping must be in (0, 1] (a fraction of the mean Hessian diagonal), "
                            f"got {self.damp}")
        if self.group_size < 1:
            raise SsmqError(f"GPTQ group size must be >= 1, got {self.group_size}")
        if self.block_size < 1 or self.block_size % self.group_size:
            raise SsmqError(f"GPTQ block size {self.block_size} must be a positive multiple of the group size "
                            f"{self.group_size}")


@dataclass
class Int4Weights:
    """A quantized weight (N, K): int4 codes (int8 tensor) and its scales.
    W4A16: `scale` fp32 (N, K/group). W4A8: `scale` = s_c fp32 (N,), `group_scale` int16 (N, K/group)."""

    codes: torch.Tensor
    scale: torch.Tensor
    group_scale: torch.Tensor | None = None

    @property
    def layout(self) -> str:
        return W4A16 if self.group_scale is None else W4A8

    def dequantize(self) -> torch.Tensor:
        """The weights the codes stand for, in fp32."""
        k = self.codes.shape[1]
        if self.group_scale is None:
            return self.codes.float() * expand_groups(self.scale, k)
        return self.scale[:, None] * (self.codes.float() * expand_groups(self.group_scale.float(), k))


def rtn(w: torch.Tensor, layout: str, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight") -> Int4Weights:
    """Round-to-nearest quantization of w (N, K) in the given layout (docs/numerics.md §7.2-7.3)."""
    if layout == W4A16:
        return Int4Weights(*quantize_int4(w, group_size, name))
    if layout == W4A8:
        return Int4Weights(*quantize_int4_two_level(w, group_size, name))
    raise SsmqError(f"unknown int4 weight layout {layout!r} (expected {W4A16!r} or {W4A8!r})")


class HessianAccumulator:
    """Running H = Σ x xᵀ / tokens over the rows of the inputs it is given: each call's product in fp32
    (GPTQ's own precision; a few times faster than float64 on CPUs), summed over calls in float64."""

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (rows.t() @ rows).double()
        self.tokens += rows.shape[0]

    def result(self) -> torch.Tensor:
        if self.tokens == 0:
            raise SsmqError("GPTQ: no calibration tokens reached this layer")
        return self.sum / self.tokens


def _inverse_hessian_factor(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the damped inverse Hessian, mask of dead input columns)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise SsmqError(f"{name}: the damped Hessian is not positive definite; use a larger GPTQ damping")
    inverse = torch.cholesky_inverse(factor)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info):
        raise SsmqError(f"{name}: the inverse Hessian is not positive definite; use a larger GPTQ damping")
    return upper, dead


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, layout: str, config: GPTQConfig = GPTQConfig(),
         name: str = "weight") -> Int4Weights:
    """GPTQ quantization of w (N, K) with the input Hessian (K, K), in the W4A16 or W4A8 layout.

    W4A16 group scales are max(amax / 7, 1e-6) of each group as updated so far. W4A8 fixes the row
    scales s_c from the original weights first (max fp group scale / 127), then sets each group's
    integer scale g = clamp(round(s_grp / s_c), 1, 127) from the updated group."""
    n, k = w.shape
    if hessian.shape != (k, k):
        raise SsmqError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not match the weight's K={k}")
    if layout not in (W4A16, W4A8):
        raise SsmqError(f"unknown int4 weight layout {layout!r} (expected {W4A16!r} or {W4A8!r})")
    group = group_size_for(k, config.group_size, name)
    block = config.block_size if k > config.group_size else k
    work = w.detach().double().clone()
    upper, dead = _inverse_hessian_factor(hessian.to(work.device).double(), config.damp, name)
    work[:, dead] = 0.0
    n_groups = k // group
    codes = torch.zeros(n, k, dtype=torch.int8, device=work.device)
    fp_scales = torch.zeros(n, n_groups, dtype=torch.float32, device=work.device)
    int_scales = torch.zeros(n, n_groups, dtype=GROUP_SCALE_DTYPE, device=work.device)
    channel = None
    if layout == W4A8:
        original = work.float().reshape(n, n_groups, group).abs().amax(dim=-1)
        channel = two_level_channel_scale(group_scales_from_amax(original))
    for start in range(0, k, block):
        stop = min(start + block, k)
        cols = work[:, start:stop].clone()
        errors = torch.zeros_like(cols)
        u = upper[start:stop, start:stop]
        step = None
        for j in range(stop - start):
            col = start + j
            if col % group == 0:
                grp = col // group
                s_grp = group_scales_from_amax(cols[:, j:j + group].float().abs().amax(dim=-1))
                if channel is None:
                    fp_scales[:, grp] = s_grp
                    step = s_grp
                else:
                    int_scales[:, grp] = integer_group_scales(s_grp, channel)
                    step = channel * int_scales[:, grp].float()
            q = round_to_int4(cols[:, j].float(), step)
            codes[:, col] = q
            err = (cols[:, j] - q.double() * step.double()) / u[j, j]
            cols[:, j:] -= err[:, None] * u[j, j:][None, :]
            errors[:, j] = err
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    if channel is None:
        return Int4Weights(codes, fp_scales)
    return Int4Weights(codes, channel, int_scales)


def input_tap(path: str) -> str:
    """The tap that sees the input of the linear module at `path` (GPTQ's Hessian source)."""
    if path == "lm_head":
        return "norm_f.out"
    parts = path.split(".")
    suffix = ".".join(parts[3:])
    if parts[:2] == ["backbone", "layers"] and suffix in INPUT_TAPS:
        return f"layers.{parts[2]}.{INPUT_TAPS[suffix]}"
    raise SsmqError(f"GPTQ has no input tap for module {path!r}; it applies to in_proj, out_proj and lm_head")


@torch.no_grad()
def collect_hessians(model: MambaLM, data: CalibrationData, paths: list[str], batch_size: int = 1,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """The input Hessian of each linear module in `paths`, from one forward pass over the documents,
    `batch_size` at a time, right-padded. Only each document's own positions are added (exact: the model
    is causal, so padding never reaches them); the result may differ from batch size 1 in the last bits."""
    if batch_size < 1:
        raise SsmqError(f"batch size must be >= 1, got {batch_size}")
    by_tap: dict[str, list[HessianAccumulator]] = {}
    accumulators = {}
    for path in paths:
        k = model.get_submodule(path).weight.shape[1]
        accumulators[path] = HessianAccumulator(k, model.device)
        by_tap.setdefault(input_tap(path), []).append(accumulators[path])
    lengths: list[int] = []

    def hook(name: str, x: torch.Tensor) -> None:
        rows = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
        for acc in by_tap[name]:
            acc.add(rows)

    handles = [model.taps.add(tap, hook) for tap in by_tap]
    try:
        with tqdm(total=data.n, desc="gptq hessians", unit="doc", file=sys.stderr, disable=not progress) as bar:
            for start in range(0, data.n, batch_size):
                docs = data.token_ids[start:start + batch_size]
                lengths[:] = [len(d) for d in docs]
                ids = torch.zeros(len(docs), max(lengths), dtype=torch.long)
                for row, doc in enumerate(docs):
                    ids[row, :len(doc)] = torch.tensor(doc, dtype=torch.long)
                model.backbone(ids.to(model.device), None)
                bar.update(len(docs))
    finally:
        for h in handles:
            h.remove()
    return {path: acc.result() for path, acc in accumulators.items()}


@torch.no_grad()
def gptq_model(model: MambaLM, data: CalibrationData, layouts: dict[str, str], config: GPTQConfig = GPTQConfig(),
               batch_size: int = 1, progress: bool = True) -> dict[str, Int4Weights]:
    """GPTQ for the linear modules `layouts` names (module path -> W4A16 or W4A8) of an fp model, with
    Hessians from `data` (`batch_size` documents per forward). Returns the quantized weights on the CPU;
    the model is not modified."""
    hessians = collect_hessians(model, data, list(layouts), batch_size, progress)
    out = {}
    for path, layout in tqdm(layouts.items(), desc="gptq", unit="layer", file=sys.stderr, disable=not progress):
        weight = model.get_submodule(path).weight
        q = gptq(weight, hessians.pop(path), layout, config, path)
        out[path] = Int4Weights(q.codes.cpu(), q.scale.cpu(), None if q.group_scale is None else q.group_scale.cpu())
    log.info("GPTQ quantized %d linear layers on %d documents (%d tokens)", len(out), data.n, data.tokens)
    return out


def provenance(config: GPTQConfig, data: CalibrationData) -> dict[str, Any]:
    """What a checkpoint records about its GPTQ run."""
    return {"damp": config.damp, "group_size": config.group_size, "block_size": config.block_size,
            "sequential": False, "act_order": False, "data": data.provenance()}


_LAYOUT_OF_KIND = {"w4a16_linear": W4A16, "w4a8_linear": W4A8}


def gptq_targets(plan: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The plan's entries whose codes GPTQ chooses: module path -> int4 layout."""
    return {path: _LAYOUT_OF_KIND[spec["kind"]] for path, spec in plan.items() if spec.get("gptq")}


def load_gptq_weights(model: torch.nn.Module, weights: dict[str, Int4Weights]) -> None:
    """Store GPTQ's codes and scales into the int4 modules of a converted model (replacing the
    round-to-nearest ones they were built with)."""
    for path, q in weights.items():
        model.get_submodule(path).load_int4(q)


def check_int4_plan(model: torch.nn.Module, plan: dict[str, dict[str, Any]]) -> None:
    """Refuse, before any calibration work, an int4 plan entry whose input dimension cannot be packed or
    grouped (SsmqError naming the module)."""
    for path, spec in plan.items():
        if spec["kind"] in _LAYOUT_OF_KIND or spec["kind"] == "embedding_q4":
            k = model.get_submodule(path).weight.shape[1]
            if k % 2:
                raise SsmqError(f"{path}: int4 weights need an even input dimension, got K={k}")
            group_size_for(k, spec["group_size"], path)
