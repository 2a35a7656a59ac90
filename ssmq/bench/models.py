"""Models to benchmark: random fp16 models and random quantized twins of any recipe (W8A8, W4A8, W4A16) of a
given shape, built directly on the device, and the inference preparation they all get.

Random weights follow the magnitudes of mamba_ssm's initialisation (so activations and scans stay in
range), but timing depends only on shapes. A quantized twin is assembled exactly as `ssmq quantize` builds
the model: the recipe's precision plan, the online Hadamard rotation where the recipe rotates the out_proj
input, and a scale book whose entries have the names and shapes the recipe's scale rules give each tap
(per tensor, per SSD group, [SSD group, head group, channel group] ...), with plausible values. The
fp-equivalent transforms (folded norms, head reordering, the rotation fused into out_proj) only change
weight values, which are random here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import torch

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig
from ssmq.models.lm import MambaLM
from ssmq.ops.int4 import GROUP_SCALE_DTYPE, GROUP_SCALE_MAX, INT4_MAX
from ssmq.ops.quantize import QMAX
from ssmq.quant.int4_modules import Int4Embedding, W4A8Linear, W4A16Linear
from ssmq.quant.mamba2_modules import tap_channels
from ssmq.quant.observers import STATE_TAP, local_name
from ssmq.quant.plan import Plan, build_plan, convert, scale_names, shares_int8_table, tie_int8_table
from ssmq.quant.qmodel import QuantizedMambaLM, store_float_params
from ssmq.quant.recipes import Recipe, check_arch, get_recipe
from ssmq.quant.rules import RuleSet
from ssmq.quant.scalebook import ScaleBook, ScaleEntry
from ssmq.quant.stats import derive_value
from ssmq.quant.transforms import HadamardRotation

# plausible activation scales per tap (values ~ scale * 64); grouped scales take the same value in every group
TAP_SCALES = {"norm.out": 0.03, "in_proj.out": 0.02, "conv.out": 0.01, "x_proj.out": 0.02,
              "dt_proj.out": 0.02, "ssm.state": 0.02, "out_proj.in": 0.01, "norm_f.out": 0.03,
              # Mamba2
              "in_proj.z": 0.02, "in_proj.x": 0.02, "in_proj.B": 0.02, "in_proj.C": 0.02, "in_proj.dt": 0.02,
              "conv.x": 0.01, "conv.B": 0.01, "conv.C": 0.01}
EMBEDDING_STD = 0.02  # mamba_ssm's embedding initialisation
DEFAULT_RECIPES = {"mamba1": "quamba1", "mamba2": "quamba2-w8a8"}  # the twin `ssmq bench` times by default


def _uniform(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    t.copy_(torch.empty(t.shape, device=t.device, dtype=torch.float32).uniform_(-bound, bound, generator=gen))


def _inverse_softplus_dt(shape: torch.Size, cfg: MambaConfig, device: torch.device,
                         gen: torch.Generator) -> torch.Tensor:
    """mamba_ssm's dt bias: softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(shape, device=device, generator=gen)
                   * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


@torch.no_grad()
def _fill_float(model: MambaLM, gen: torch.Generator) -> None:
    """mamba_ssm-like values for the float parameters (linear weights of fp models included): S4D-real A_log
    (Mamba1, (d_inner, d_state)) or A = U(1, 16) per head (Mamba2), dt biases, conv weights, norms (the gated
    norm of Mamba2 included) and D at 1."""
    cfg = model.config
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("embeddings.weight"):
            p.copy_(torch.randn(p.shape, device=p.device, generator=gen) * EMBEDDING_STD)
        elif leaf == "A_log" and p.dim() == 1:  # Mamba2: one decay per head
            p.copy_(torch.log(torch.empty(p.shape, device=p.device).uniform_(1, 16, generator=gen)))
        elif leaf == "A_log":
            p.copy_(torch.log(torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=torch.float32)).expand(p.shape))
        elif name.endswith("dt_proj.bias") or leaf == "dt_bias":
            p.copy_(_inverse_softplus_dt(p.shape, cfg, p.device, gen))
        elif name.endswith("conv1d.weight") or name.endswith("conv1d.bias"):
            _uniform(p, 1 / math.sqrt(cfg.d_conv), gen)
        elif leaf == "weight" and p.dim() == 2:
            fan_in = p.shape[1]
            _uniform(p, 1 / math.sqrt(fan_in) / (math.sqrt(cfg.n_layer) if "out_proj" in name else 1), gen)
        elif leaf == "bias":
            p.zero_()
        else:  # D, norm weights (the gated norm's included)
            p.fill_(1.0)


@torch.no_grad()
def _fill_int4(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random packed int4 codes (every byte is two valid codes) and scales matching the fp initialisation's
    magnitudes: W4A16 fp32 group scales; W4A8 an fp32 row scale s_c and integer group scales in [64, 127]
    (w = s_c * g * code); int4 embedding rows fp32 group scales."""
    w = module.weight
    w.copy_(torch.randint(0, 256, w.shape, device=w.device, generator=gen, dtype=torch.uint8))
    if isinstance(module, Int4Embedding):
        module.weight_scale.fill_(3 * EMBEDDING_STD / INT4_MAX)
        return
    group_scale = 1 / (math.sqrt(module.in_features) * INT4_MAX)
    if isinstance(module, W4A16Linear):
        module.weight_scale.fill_(group_scale)
        return
    g = module.group_scale
    g.copy_(torch.randint(GROUP_SCALE_MAX // 2, GROUP_SCALE_MAX + 1, g.shape, device=g.device, generator=gen,
                          dtype=GROUP_SCALE_DTYPE))
    module.weight_scale.fill_(group_scale / GROUP_SCALE_MAX)


@torch.no_grad()
def _fill_quantized(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weight codes with weight scales matching the fp initialisation's magnitudes: int8 codes in
    [-127, 127] with per-tensor or per-row scales, packed int4 codes with their group scales."""
    for module in model.modules():
        if isinstance(module, (W4A16Linear, W4A8Linear, Int4Embedding)):
            _fill_int4(module, gen)
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype == torch.int8:
            w.copy_(torch.randint(-127, 128, w.shape, device=w.device, generator=gen, dtype=torch.int8))
            module.weight_scale.fill_(1 / (math.sqrt(w.shape[-1]) * QMAX))


def _channel_shape(tap: str, cfg: MambaConfig) -> tuple[int, ...]:
    """The shape of a tap's per-channel maxima as calibration records them (ssmq.quant.calibrate): one axis
    of channels for activations; (d_inner, d_state) for a Mamba1 state, (nheads, d_state) for a Mamba2 one."""
    name = local_name(tap)
    if name == STATE_TAP:
        return (cfg.d_inner, cfg.d_state) if cfg.arch == "mamba1" else (cfg.nheads, cfg.d_state)
    widths = {"norm.out": cfg.d_model, "norm_f.out": cfg.d_model, "in_proj.out": 2 * cfg.d_inner,
              "conv.out": cfg.d_inner, "x_proj.out": cfg.dt_rank + 2 * cfg.d_state, "dt_proj.out": cfg.d_inner,
              "out_proj.in": cfg.d_inner}
    return (widths[name],) if name in widths else (tap_channels(tap, cfg),)


def plausible_scales(cfg: MambaConfig, recipe: Recipe, plan: Plan, device: torch.device | str) -> ScaleBook:
    """The scale book `ssmq quantize` would build for `plan` (same names, observers and shapes, each value
    derived by the recipe's scale rule from stand-in statistics in which every channel of a tap reaches
    TAP_SCALES * 127), on `device`. Empty for recipes without static activation scales."""
    if recipe.activations != "static":
        return ScaleBook()
    entries = {}
    for name, (spec, rule) in RuleSet(list(recipe.rules)).assign(cfg.arch, scale_names(plan)).items():
        absmax = TAP_SCALES[local_name(name)] * QMAX
        alphas = (spec.param("alpha"),) if spec.kind == "percentile" else ()
        value = derive_value(spec, name, torch.full(_channel_shape(name, cfg), absmax),
                             torch.full((1, len(alphas)), absmax), alphas, cfg)
        entries[name] = ScaleEntry((value / QMAX).float().to(device), spec.kind, dict(spec.params),
                                   {"rule": str(rule), "source": "random weights (plausible value)"})
    return ScaleBook(entries)


def random_fp_model(cfg: MambaConfig, device: torch.device | str, dtype: torch.dtype = torch.float16,
                    seed: int = 0) -> MambaLM:
    """A MambaLM of shape `cfg` with random weights, materialised on `device` in `dtype` (directly: an fp16
    8B model never exists in fp32; the values are the fp32 draws rounded once, as a cast would)."""
    with torch.device("meta"):
        model = MambaLM(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    _fill_float(model, torch.Generator(device).manual_seed(seed))
    return model.eval()


def random_quantized_model(cfg: MambaConfig, device: torch.device | str, recipe: str = "quamba1", seed: int = 0,
                           quantize_embedding: bool = False, quantize_lm_head: bool = False) -> QuantizedMambaLM:
    """A model of shape `cfg` quantized as `ssmq quantize --recipe RECIPE [--quantize-embedding]
    [--quantize-lm-head]` builds it (the same modules, tensor names, shapes and dtypes, and scale names and
    shapes), with random weight codes and plausible weight and activation scales, on `device`. With tied
    embeddings, an int8 embedding and W8A8 lm_head share one table (docs/numerics.md 4.7).
    SsmqError for an unknown recipe or one that does not apply to cfg.arch."""
    r = get_recipe(recipe).with_options(arch=cfg.arch)
    check_arch(r, cfg.arch)
    plan = build_plan(cfg, r, quantize_embedding, quantize_lm_head)
    book = plausible_scales(cfg, r, plan, device)
    with torch.device("meta"):
        model = MambaLM(cfg)
        if r.rotate_out_proj:  # the rotate_out_proj transform; a static plan replaces it with QuantHadamard
            for block in model.backbone.layers:
                block.mixer.out_rotation = HadamardRotation(cfg.d_inner)
    convert(model, plan, book, dynamic=r.activations == "dynamic", from_float=False)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    _fill_float(model, gen)
    _fill_quantized(model, gen)
    if shares_int8_table(plan, cfg):  # to_empty gave each module its own copy of the shared buffers
        tie_int8_table(model)
    elif cfg.tie_embeddings and "lm_head" not in plan:
        model.lm_head.weight = model.backbone.embeddings.weight
    store_float_params(model)
    qc = {"recipe": asdict(r), "transforms": list(r.transforms), "plan": plan,
          "options": {"quantize_embedding": quantize_embedding, "quantize_lm_head": quantize_lm_head},
          "source_model": {"path": "<random weights>"}}
    return QuantizedMambaLM(model, book, qc).eval()


def bench_recipes(names: Sequence[str] | None, arch: str) -> list[str]:
    """The recipes whose random twins `ssmq bench` times for a model of `arch`: `names` checked (known,
    applicable to arch, each once), or DEFAULT_RECIPES[arch] when none are given."""
    chosen = list(names) if names else [DEFAULT_RECIPES[arch]]
    for name in chosen:
        check_arch(get_recipe(name), arch)
    repeated = sorted({n for n in chosen if chosen.count(n) > 1})
    if repeated:
        raise SsmqError(f"recipe {repeated[0]!r} given twice")
    return chosen


def random_twins(cfg: MambaConfig, device: torch.device | str, recipes: Sequence[str], seed: int = 0,
                 quantized_head: bool = False) -> dict[str, QuantizedMambaLM]:
    """One random quantized model per recipe (label = recipe name); `quantized_head` quantizes the
    embedding and lm_head in each recipe's weight format (int8, or int4 for the 4-bit recipes)."""
    return {r: random_quantized_model(cfg, device, r, seed, quantize_embedding=quantized_head,
                                      quantize_lm_head=quantized_head) for r in recipes}


@torch.no_grad()
def prepare_for_inference(model: MambaLM) -> MambaLM:
    """What every benchmarked model gets before timing: the small per-channel parameters the mixers read as
    fp32 (A_log, D, conv and dt biases) stored in fp32, as a quantized model stores them, so no cast runs
    per call (the values are unchanged: fp16 -> fp32 is exact), and a quantized model's scale book on its
    device (where QuantizedMambaLM.to puts it)."""
    if isinstance(model, QuantizedMambaLM):
        model.scales.to(model.device)
    store_float_params(model, others_fp16=False)
    return model
