"""The Mamba language model: embedding, blocks (RMSNorm + mixer + residual), final norm, lm_head.

Module names follow the transformers checkpoint keys (`backbone.embeddings.weight`,
`backbone.layers.{i}.mixer.in_proj.weight`, `backbone.norm_f.weight`, `lm_head.weight`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssmq.models.cache import MambaCache
from ssmq.models.config import MambaConfig
from ssmq.models.layers import RMSNorm
from ssmq.models.mamba1 import Mamba1Mixer
from ssmq.models.mamba2 import Mamba2Mixer
from ssmq.models.taps import Taps, tap_names


class Block(nn.Module):
    """(residual add + RMSNorm) -> mixer. The residual stream is fp32 when `residual_in_fp32`.

    The add of a block's mixer output to the stream runs in the *next* block's norm (or the final norm),
    one fused op: a block takes (previous mixer output, stream before it) and returns its own pair.
    The `block.out` tap still sees the stream after the block: while a hook listens there, the block
    adds it itself, taps it, and hands it on as a stream with nothing left to add."""

    def __init__(self, cfg: MambaConfig, layer: int, taps: Taps):
        super().__init__()
        self.taps, self.prefix = taps, f"layers.{layer}."
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.residual_in_fp32)
        mixer_cls = Mamba1Mixer if cfg.arch == "mamba1" else Mamba2Mixer
        self.mixer = mixer_cls(cfg, layer, taps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                cache: MambaCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.prefix
        normed, residual = self.norm(hidden, residual)
        h = self.taps(p + "norm.out", normed)
        h = self.taps(p + "mixer.out", self.mixer(h, cache))
        if self.taps.has_hook(p + "block.out"):
            return self.taps(p + "block.out", residual + h), None
        return h, residual


class Backbone(nn.Module):
    def __init__(self, cfg: MambaConfig, taps: Taps):
        super().__init__()
        self.taps = taps
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, taps) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.residual_in_fp32)

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None) -> torch.Tensor:
        hidden, residual = self.embeddings(input_ids), None
        for block in self.layers:
            hidden, residual = block(hidden, residual, cache)
        return self.taps("norm_f.out", self.norm_f(hidden, residual)[0])


class MambaLM(nn.Module):
    """A Mamba1 or Mamba2 causal language model. `model.taps` addresses every quantization point."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.config = cfg
        self.taps = Taps(tap_names(cfg.arch, cfg.n_layer))
        self.backbone = Backbone(cfg, self.taps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the model's activations (that of the final norm)."""
        return self.backbone.norm_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.norm_f.weight.device

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length). With a cache, continues from its
        states and leaves the final states in it."""
        logits = self.lm_head(self.backbone(input_ids, cache))
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        return logits

    def new_cache(self) -> MambaCache:
        """An empty decoding cache for this model."""
        return MambaCache.empty(self.config.n_layer)


@torch.no_grad()
def init_weights(model: MambaLM, seed: int = 0) -> MambaLM:
    """Random initialisation in the manner of mamba_ssm (S4D-real A, dt log-uniform in
    [dt_min, dt_max], out_proj scaled by 1/sqrt(n_layer)), deterministic given `seed`."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, bound: float) -> None:
        t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=gen))

    model.backbone.embeddings.weight.copy_(torch.randn(model.backbone.embeddings.weight.shape, generator=gen) * 0.02)
    for block in model.backbone.layers:
        mixer = block.mixer
        for lin in (mixer.in_proj, mixer.out_proj, getattr(mixer, "x_proj", None)):
            if lin is None:
                continue
            uniform(lin.weight, 1 / math.sqrt(lin.in_features))
            if lin.bias is not None:
                lin.bias.zero_()
        mixer.out_proj.weight.div_(math.sqrt(cfg.n_layer))
        uniform(mixer.conv1d.weight, 1 / math.sqrt(cfg.d_conv))
        if mixer.conv1d.bias is not None:
            uniform(mixer.conv1d.bias, 1 / math.sqrt(cfg.d_conv))
        n_dt = cfg.d_inner if cfg.arch == "mamba1" else cfg.nheads
        dt = torch.exp(torch.rand(n_dt, generator=gen) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        if cfg.arch == "mamba1":
            uniform(mixer.dt_proj.weight, cfg.dt_rank ** -0.5)
            mixer.dt_proj.bias.copy_(inv_softplus_dt)
            mixer.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1))
        else:
            mixer.dt_bias.copy_(inv_softplus_dt)
            mixer.A_log.copy_(torch.log(torch.empty(cfg.nheads).uniform_(1, 16, generator=gen)))
            mixer.norm.weight.fill_(1.0)
        mixer.D.fill_(1.0)
        block.norm.weight.fill_(1.0)
    model.backbone.norm_f.weight.fill_(1.0)
    if not cfg.tie_embeddings:
        uniform(model.lm_head.weight, 1 / math.sqrt(cfg.d_model))
    return model


def build_model(cfg: MambaConfig, seed: int | None = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> MambaLM:
    """A model of the given shape; randomly initialised (deterministically) unless seed is None."""
    model = MambaLM(cfg)
    if seed is not None:
        init_weights(model, seed)
    return model.to(device=device, dtype=dtype).eval()
