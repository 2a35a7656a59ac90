"""Quamba2's "sort and cluster" for Mamba2: a channel order that makes head-grouped conv.x scales tight.

Per SSD group (whose heads share B and C, so a head never leaves its group), heads are sorted by the
largest |x| they show at the `conv.x` tap, and inside each head its channels are sorted by their own
largest |x| (ascending, stable: deterministic). The grouped scales of the quamba2 rules then take
contiguous runs of this order: `head_groups` equal runs of heads per SSD group and `channel_groups`
equal runs of channels per head (ssmq.quant.observers.mamba2_grouping), so each scale covers heads
and channels of similar range — Quamba2's clusters, here of equal size.

The permutation is applied to every parameter indexing those channels or heads, which leaves the fp
model's function unchanged: in_proj rows of the z and x segments (channels) and of the dt segment
(heads), conv1d's x channels, A_log / D / dt_bias (heads), the gated norm weight (channels; each norm
group is one SSD group's channels, which stay together) and out_proj's columns. It is baked into the
weights: a quantized checkpoint stores permuted weights and needs no permutation to load.
"""

from __future__ import annotations

from typing import Any

import torch

from ssmq.errors import SsmqError
from ssmq.models.config import MambaConfig
from ssmq.models.lm import MambaLM
from ssmq.models.mamba2 import Mamba2Mixer
from ssmq.quant.rules import ObserverSpec, parse_observer

CONV_X_OBSERVER: ObserverSpec = parse_observer("minmax(per=channel)")


def sort_and_cluster(channel_absmax: torch.Tensor, cfg: MambaConfig) -> torch.Tensor:
    """The new channel order of one layer's x channels: perm[new] = old, a permutation of d_inner.

    channel_absmax: (d_inner,) the largest |x| of each channel at the `conv.x` tap."""
    heads, headdim, groups = cfg.nheads, cfg.headdim, cfg.ngroups
    per_group = heads // groups
    if channel_absmax.shape != (cfg.d_inner,):
        raise SsmqError(f"conv.x statistics have shape {tuple(channel_absmax.shape)}; expected ({cfg.d_inner},)")
    m = channel_absmax.float().reshape(heads, headdim)
    head_order = torch.sort(m.amax(-1).reshape(groups, per_group), dim=-1, stable=True).indices
    old_heads = (head_order + torch.arange(groups)[:, None] * per_group).reshape(heads)
    channel_order = torch.sort(m, dim=-1, stable=True).indices
    return (old_heads[:, None] * headdim + channel_order[old_heads]).reshape(-1)


def check_permutation(perm: torch.Tensor, cfg: MambaConfig, what: str) -> None:
    """SsmqError naming `what` unless perm moves whole heads, within their SSD groups, and permutes each
    head's channels: the only orders that leave a Mamba2 layer's function unchanged."""
    heads, headdim = cfg.nheads, cfg.headdim
    if perm.shape != (cfg.d_inner,) or not torch.equal(torch.sort(perm).values, torch.arange(cfg.d_inner)):
        raise SsmqError(f"{what}: not a permutation of the {cfg.d_inner} x channels")
    old_head = perm.reshape(heads, headdim) // headdim
    if not bool((old_head == old_head[:, :1]).all()):
        raise SsmqError(f"{what}: mixes channels of different heads")
    per_group = heads // cfg.ngroups
    new_group = torch.arange(heads) // per_group
    if not torch.equal(old_head[:, 0] // per_group, new_group):
        raise SsmqError(f"{what}: moves a head out of its SSD group (B and C are shared per group)")


@torch.no_grad()
def permute_mixer(mixer: Mamba2Mixer, perm: torch.Tensor) -> None:
    """Apply the channel order perm (perm[new] = old) to one fp Mamba2 mixer, in place."""
    d, heads, headdim = mixer.d_inner, mixer.nheads, mixer.headdim
    perm = perm.to(torch.long)
    old_heads = perm.reshape(heads, headdim)[:, 0] // headdim
    dt_start = 2 * d + 2 * mixer.ngroups * mixer.d_state
    rows = torch.arange(mixer.in_proj.weight.shape[0])
    rows[:d], rows[d:2 * d], rows[dt_start:dt_start + heads] = perm, d + perm, dt_start + old_heads
    proj = mixer.in_proj
    proj.weight.copy_(proj.weight[rows])
    if proj.bias is not None:
        proj.bias.copy_(proj.bias[rows])
    channels = torch.arange(mixer.conv1d.weight.shape[0])
    channels[:d] = perm
    mixer.conv1d.weight.copy_(mixer.conv1d.weight[channels])
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias.copy_(mixer.conv1d.bias[channels])
    for p in (mixer.A_log, mixer.dt_bias, mixer.D):
        p.copy_(p[old_heads] if p.numel() == heads else p[perm])
    mixer.norm.weight.copy_(mixer.norm.weight[perm])
    mixer.out_proj.weight.copy_(mixer.out_proj.weight[:, perm])


def reorder_heads(model: MambaLM, params: dict[str, Any] | None = None) -> None:
    """The `reorder_heads` transform: apply the recorded per-layer orders (`head_order_params`)."""
    cfg = model.config
    if cfg.arch != "mamba2":
        raise SsmqError(f"reorder_heads applies to Mamba2 models; this model is {cfg.arch}")
    if params is None or "permutations" not in params:
        raise SsmqError("reorder_heads needs the channel orders computed from calibration statistics "
                        "(calibrate with the recipe first)")
    perms = params["permutations"]
    if len(perms) != cfg.n_layer:
        raise SsmqError(f"reorder_heads: {len(perms)} layer orders recorded; the model has {cfg.n_layer} layers")
    for i, (block, perm) in enumerate(zip(model.backbone.layers, perms)):
        perm = torch.as_tensor(perm, dtype=torch.long)
        check_permutation(perm, cfg, f"reorder_heads order of layer {i}")
        permute_mixer(block.mixer, perm)


def head_order_params(conv_x_absmax: list[torch.Tensor], cfg: MambaConfig) -> dict[str, Any]:
    """The `reorder_heads` parameters (JSON-ready): one channel order per layer, from each layer's
    per-channel max |x| at its `conv.x` tap over the calibration documents (`CONV_X_OBSERVER`)."""
    if cfg.arch != "mamba2":
        raise SsmqError(f"head reordering applies to Mamba2 models; this model is {cfg.arch}")
    if len(conv_x_absmax) != cfg.n_layer:
        raise SsmqError(f"head reordering needs conv.x statistics of {cfg.n_layer} layers, got {len(conv_x_absmax)}")
    return {"sort": "heads per SSD group by max |conv.x|, channels per head by max |conv.x|, ascending",
            "permutations": [sort_and_cluster(m, cfg).tolist() for m in conv_x_absmax]}
