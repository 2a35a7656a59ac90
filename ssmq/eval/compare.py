"""Where two models of the same architecture diverge: relative error of each block's output and the logits."""

from __future__ import annotations

import torch

from ssmq.models.lm import MambaLM


def _block_outputs(model: MambaLM, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    with model.taps.hooked("layers.*.block.out", lambda name, x: seen.__setitem__(name, x.float().cpu()) and None):
        logits = model(ids.to(model.device)).float().cpu()
    return seen, logits


@torch.no_grad()
def layer_errors(reference: MambaLM, candidate: MambaLM, ids: torch.Tensor) -> dict[str, float]:
    """||candidate - reference|| / ||reference|| for every `layers.i.block.out` and for the logits."""
    ref, ref_logits = _block_outputs(reference, ids)
    cand, cand_logits = _block_outputs(candidate, ids)
    errors = {name: float((cand[name] - ref[name]).norm() / ref[name].norm()) for name in ref}
    errors["logits"] = float((cand_logits - ref_logits).norm() / ref_logits.norm())
    return errors
