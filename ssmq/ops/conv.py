"""Causal depthwise conv1d, the reference (float) version.

One op covers prefill and decoding: the previous `k - 1` inputs are passed in as `state`
(zeros at the start of a sequence) and the last `k - 1` inputs come back as the new state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over the sequence.

    x: (batch, length, channels); weight: (channels, k); bias: (channels,) or None;
    state: (batch, k - 1, channels) inputs preceding x, or None for zeros.
    Returns (out (batch, length, channels) in fp32, new state (batch, k - 1, channels) in x's dtype).
    """
    batch, _, channels = x.shape
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(batch, k - 1, channels)
    padded = torch.cat([state.to(x.dtype), x], dim=1)
    out = F.conv1d(padded.transpose(1, 2).float(), weight.float().unsqueeze(1),
                   None if bias is None else bias.float(), groups=channels)
    return out.transpose(1, 2), padded[:, padded.shape[1] - (k - 1):]
