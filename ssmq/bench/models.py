"""Models to benchmark: random fp16 and W8A8 (quamba1 plan) models of a given shape, built directly on
the device, and the inference preparation both get.

Random weights follow the magnitudes of mamba_ssm's initialisation (so activations and scans stay in
range), but timing depends only on shapes. The W8A8 model is assembled from the quamba1 precision plan
with one static per-tensor scale per tap, exactly the modules `ssmq quantize` produces.
"""

from __future__ import annotations

import math

import torch

from ssmq.models.config import MambaConfig
from ssmq.models.lm import MambaLM
from ssmq.quant.plan import build_plan, convert, scale_names, shares_int8_table, tie_int8_table
from ssmq.quant.qmodel import QuantizedMambaLM, store_float_params
from ssmq.quant.recipes import get_recipe
from ssmq.quant.scalebook import ScaleBook, ScaleEntry

# per-tensor activation scales of plausible size for each tap of the quamba1 plan (values ~ scale * 64)
TAP_SCALES = {"norm.out": 0.03, "in_proj.out": 0.02, "conv.out": 0.01, "x_proj.out": 0.02,
              "dt_proj.out": 0.02, "ssm.state": 0.02, "out_proj.in": 0.01, "norm_f.out": 0.03,
              # Mamba2 (one value per tensor; the grouped layouts broadcast the same way in every op)
              "in_proj.z": 0.02, "in_proj.x": 0.02, "in_proj.B": 0.02, "in_proj.C": 0.02, "in_proj.dt": 0.02,
              "conv.x": 0.01, "conv.B": 0.01, "conv.C": 0.01}


def _uniform(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    t.copy_(torch.empty(t.shape, device=t.device, dtype=torch.float32).uniform_(-bound, bound, generator=gen))


@torch.no_grad()
def _fill_float(model: MambaLM, gen: torch.Generator) -> None:
    """mamba_ssm-like values for the float parameters (linear weights of fp models included)."""
    cfg = model.config
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("embeddings.weight"):
            p.copy_(torch.randn(p.shape, device=p.device, generator=gen) * 0.02)
        elif name.endswith("A_log"):
            p.copy_(torch.log(torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=torch.float32)).expand(p.shape))
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(p.shape, device=p.device, generator=gen)
                           * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)).clamp(min=1e-4)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith("conv1d.weight") or name.endswith("conv1d.bias"):
            _uniform(p, 1 / math.sqrt(cfg.d_conv), gen)
        elif leaf == "weight" and p.dim() == 2:
            fan_in = p.shape[1]
            _uniform(p, 1 / math.sqrt(fan_in) / (math.sqrt(cfg.n_layer) if "out_proj" in name else 1), gen)
        elif leaf == "bias":
            p.zero_()
        else:  # D, norm weights
            p.fill_(1.0)


@torch.no_grad()
def _fill_int8(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random int8 weight codes with weight scales matching the fp initialisation's magnitudes."""
    for name, buf in model.named_buffers():
        if buf.dtype == torch.int8:
            buf.copy_(torch.randint(-127, 128, buf.shape, device=buf.device, generator=gen, dtype=torch.int8))
        elif name.endswith("weight_scale"):
            fan_in = model.get_buffer(name[: -len("_scale")]).shape[-1]
            buf.fill_(1 / (math.sqrt(fan_in) * 127))


def random_fp_model(cfg: MambaConfig, device: torch.device | str, dtype: torch.dtype = torch.float16,
                    seed: int = 0) -> MambaLM:
    """A MambaLM of shape `cfg` with random weights, materialised on `device` in `dtype`."""
    with torch.device("meta"):
        model = MambaLM(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    _fill_float(model, torch.Generator(device).manual_seed(seed))
    return model.to(dtype).eval()


def random_w8a8_model(cfg: MambaConfig, device: torch.device | str, seed: int = 0, recipe: str = "quamba1",
                      int8_head: bool = False) -> QuantizedMambaLM:
    """A W8A8 model of shape `cfg` as `ssmq quantize --recipe quamba1` builds it (static per-tensor scales,
    rotated out_proj input), with random int8 weights and plausible scales, on `device`. With `int8_head`
    the embedding and lm_head are int8 too (quantize_embedding and quantize_lm_head), and with tied
    embeddings they share one table of codes and row scales (docs/numerics.md 4.7)."""
    r = get_recipe(recipe)
    with torch.device("meta"):
        model = MambaLM(cfg)
    plan = build_plan(cfg, r, quantize_embedding=int8_head, quantize_lm_head=int8_head)
    book = ScaleBook({name: ScaleEntry(torch.tensor(TAP_SCALES[name.split(".", 2)[-1] if name.startswith("layers.")
                                                               else name], device=device), "random")
                      for name in scale_names(plan)})
    convert(model, plan, book, dynamic=r.activations == "dynamic", from_float=False)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    _fill_float(model, gen)
    _fill_int8(model, gen)
    if shares_int8_table(plan, cfg):  # to_empty gave each module its own copy of the shared buffers
        tie_int8_table(model)
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    store_float_params(model)
    qc = {"recipe": {"name": recipe, "activations": r.activations}, "plan": plan, "transforms": list(r.transforms),
          "source_model": {"path": "<random weights>"}}
    return QuantizedMambaLM(model, book, qc).eval()


@torch.no_grad()
def prepare_for_inference(model: MambaLM) -> MambaLM:
    """What both benchmarked models get before timing: the small per-channel parameters the mixers read as
    fp32 (A_log, D, conv and dt biases) stored in fp32, as a quantized model stores them, so no cast runs
    per call (the values are unchanged: fp16 -> fp32 is exact), and a quantized model's scale book on its
    device (where QuantizedMambaLM.to puts it)."""
    if isinstance(model, QuantizedMambaLM):
        model.scales.to(model.device)
    store_float_params(model, others_fp16=False)
    return model
