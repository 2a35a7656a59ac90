"""Function-preserving transforms applied to an fp model before calibration.

Each leaves the fp model's logits unchanged (up to fp rounding) while changing what the taps see:
- fold_norms: each block's RMSNorm weight moves into the columns of in_proj, so `norm.out` is the
  plain normalised activation (per-channel gains end up in the per-channel-friendly weights);
- rotate_out_proj: y -> H y before out_proj (H orthonormal Hadamard), with out_proj's weight
  replaced by W H^T offline, so `out_proj.in` sees the rotated, outlier-spread activation;
- reorder_heads (Mamba2): Quamba2's head and channel order, computed from calibration statistics
  (ssmq.quant.reorder); it runs before rotate_out_proj, whose W H^T is then taken of permuted columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssmq.models.lm import MambaLM
from ssmq.ops import dispatch as ops
from ssmq.ops.hadamard import check_hadamard_size, rotate_weight_input
from ssmq.quant.reorder import reorder_heads


class HadamardRotation(nn.Module):
    """y -> H y along the last dimension (orthonormal, so out_proj can absorb H^T), computed in fp32 and
    returned in y's dtype like any float layer (an fp16 model's out_proj then stays an fp16 matmul)."""

    def __init__(self, dim: int):
        super().__init__()
        check_hadamard_size(dim)
        self.dim = dim

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return ops.hadamard_transform(y).to(y.dtype)


@torch.no_grad()
def fold_norms(model: MambaLM) -> None:
    """Fold each block's RMSNorm weight into in_proj's input columns (norm weights become 1)."""
    for block in model.backbone.layers:
        w = block.norm.weight
        proj = block.mixer.in_proj.weight
        proj.copy_((proj.float() * w.float()).to(proj.dtype))
        w.fill_(1.0)


@torch.no_grad()
def rotate_out_proj(model: MambaLM) -> None:
    """Insert the online Hadamard rotation before every out_proj and fuse H^T into its weight."""
    for block in model.backbone.layers:
        mixer = block.mixer
        weight = mixer.out_proj.weight
        mixer.out_rotation = HadamardRotation(weight.shape[1])
        weight.copy_(rotate_weight_input(weight.float()).to(weight.dtype))


TRANSFORMS = {"fold_norms": fold_norms, "reorder_heads": reorder_heads, "rotate_out_proj": rotate_out_proj}
PARAMETRIZED = ("reorder_heads",)  # transforms that take parameters computed from calibration data


def apply_transforms(model: MambaLM, names: tuple[str, ...] | list[str],
                     params: Mapping[str, Any] | None = None) -> None:
    """Apply the named transforms in place, in order; `params` gives those in PARAMETRIZED their
    parameters (as recorded in the calibration statistics' provenance)."""
    for name in names:
        if name in PARAMETRIZED:
            TRANSFORMS[name](model, (params or {}).get(name))
        else:
            TRANSFORMS[name](model)
