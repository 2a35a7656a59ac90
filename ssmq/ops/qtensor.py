"""QTensor: int8 codes with the scale they were quantized with, the value that flows between int8 ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class QTensor:
    """value = scale * codes. `scale` broadcasts against `codes`: a scalar (per tensor), a (..., 1)
    column (per token), or a vector over the last dimension (per channel / per group, expanded)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self) -> torch.Tensor:
        """The represented values in fp32."""
        return self.codes.float() * self.scale

    def split(self, sizes: int | Sequence[int], dim: int = -1) -> tuple[QTensor, ...]:
        """Split along the last dimension; a per-channel scale is split with the codes."""
        if dim not in (-1, self.codes.dim() - 1):
            raise ValueError("QTensor.split supports the last dimension only")
        parts = self.codes.split(sizes, dim=-1)
        if self.scale.dim() and self.scale.shape[-1] == self.codes.shape[-1] and self.codes.shape[-1] > 1:
            scales = self.scale.split(sizes, dim=-1)
        else:
            scales = (self.scale,) * len(parts)
        return tuple(QTensor(c, s) for c, s in zip(parts, scales))
