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

    def reshape(self, *shape: int) -> QTensor:
        """Reshape that splits or keeps the last dimension (e.g. (b, l, heads*headdim) -> (b, l, heads,
        headdim)); the scale follows: a per-channel vector is viewed with the new trailing dimensions, a
        per-row (..., 1) scale gains size-1 dimensions, a per-tensor scale is unchanged."""
        codes = self.codes.reshape(*shape)
        scale = self.scale
        if scale.dim() == 0 or scale.numel() == 1:
            return QTensor(codes, scale)
        width, trailing = self.codes.shape[-1], codes.dim() - self.codes.dim() + 1
        if trailing < 1 or codes.shape[:self.codes.dim() - 1] != self.codes.shape[:-1]:
            raise ValueError(f"QTensor.reshape {tuple(self.codes.shape)} -> {tuple(codes.shape)} must split the "
                             "last dimension only")
        if scale.shape[-1] == width and width > 1:
            return QTensor(codes, scale.reshape(*scale.shape[:-1], *codes.shape[codes.dim() - trailing:]))
        return QTensor(codes, scale.reshape(*scale.shape, *(1,) * (trailing - 1)))


def cat_channels(parts: Sequence[torch.Tensor | QTensor]) -> torch.Tensor | QTensor:
    """Concatenate along the last dimension: tensors as torch.cat does; QTensors (all or none) into one
    QTensor whose scale is per channel (each part's scale broadcast over its own channels).

    Parts that are adjacent slices of one tensor (Mamba2's x, B and C of the in_proj output) are joined
    as a view of it, without a copy; so are per-channel scales that are adjacent slices of one vector."""
    if not any(isinstance(p, QTensor) for p in parts):
        joined = _joined_view(parts)
        return joined if joined is not None else torch.cat(list(parts), dim=-1)
    if not all(isinstance(p, QTensor) for p in parts):
        raise TypeError("cat_channels: mix of QTensor and float parts")
    scales = [p.scale.expand(*p.scale.shape[:-1], p.codes.shape[-1]) if p.scale.dim()
              else p.scale.expand(p.codes.shape[-1]) for p in parts]
    if len({tuple(s.shape[:-1]) for s in scales}) > 1:
        raise ValueError("cat_channels: the parts' scales do not line up (per-tensor or per-channel scales "
                         "with per-row ones)")
    codes = _joined_view([p.codes for p in parts])
    scale = _joined_view(scales)
    return QTensor(codes if codes is not None else torch.cat([p.codes for p in parts], dim=-1),
                   scale if scale is not None else torch.cat(list(scales), dim=-1))


def _joined_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The view of the storage that `parts` tile side by side along their last (unit-stride) dimension,
    or None when they are not such slices (other storage, strides, gaps, overlapping rows, or autograd)."""
    first = parts[0]
    if first.dim() == 0 or first.stride(-1) != 1 or any(p.requires_grad for p in parts):
        return None
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if (p.dtype != first.dtype or p.device != first.device or p.shape[:-1] != first.shape[:-1]
                or p.stride() != first.stride() or p.untyped_storage().data_ptr() != ptr
                or p.storage_offset() != offset):
            return None
        offset += p.shape[-1]
    width = offset - first.storage_offset()
    if first.dim() > 1 and any(n > 1 and st < width for n, st in zip(first.shape[:-1], first.stride()[:-1])):
        return None
    return first.as_strided((*first.shape[:-1], width), first.stride(), first.storage_offset())
