"""Quantized modules with packed 4-bit weights (docs/numerics.md §7): drop-in replacements for nn.Linear
and nn.Embedding, with the call conventions of ssmq.quant.modules.

- W4A16Linear: float activations in and out (weight-only quantization).
- W4A8Linear: int8 activation QTensor in (or float, quantized by its `inp` quantizer), output
  requantized to the `out` scale when given, else returned in `out_dtype` (as W8A8Linear).
- Int4Embedding: packed rows with fp32 group scales; lookups return fp16 rows.

Weights are stored packed (uint8, two codes per byte) with their scales as buffers, so a checkpoint
holds exactly the packed representation. `load_float` quantizes fp weights by rounding to nearest;
`load_int4` takes weights already quantized (by GPTQ).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ssmq.errors import SsmqError
from ssmq.ops import dispatch
from ssmq.ops.int4 import GROUP_SCALE_DTYPE, group_size_for, pack_int4
from ssmq.ops.qtensor import QTensor
from ssmq.quant.gptq import W4A8, W4A16, Int4Weights, rtn
from ssmq.quant.modules import ActQuant, QuantCausalConv1d, _as_codes


class _Int4Linear(nn.Module):
    layout = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, name: str):
        super().__init__()
        if in_features % 2:
            raise SsmqError(f"{name}: int4 weights need an even input dimension, got K={in_features}")
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.group_size = group_size_for(in_features, group_size, name)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @torch.no_grad()
    def load_int4(self, q: Int4Weights) -> _Int4Linear:
        """Store already quantized weights (codes and scales of this module's layout and shape)."""
        if q.layout != self.layout or tuple(q.codes.shape) != (self.out_features, self.in_features):
            raise SsmqError(f"{self.name}: {q.layout} weights of shape {tuple(q.codes.shape)} do not fit a "
                            f"{self.layout} layer of shape ({self.out_features}, {self.in_features})")
        self.weight.copy_(pack_int4(q.codes))
        self.weight_scale.copy_(q.scale)
        if q.group_scale is not None:
            self.group_scale.copy_(q.group_scale)
        return self

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor, bias: torch.Tensor | None) -> _Int4Linear:
        """Round-to-nearest int4 weights from fp ones, and the fp bias."""
        self.load_int4(rtn(weight.float(), self.layout, self.group_size, self.name))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.float())
        return self


class W4A16Linear(_Int4Linear):
    """Float activations x packed int4 weights with fp32 group scales; output in the input's dtype
    (or `out_dtype`)."""

    layout = W4A16

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, name: str = "linear",
                 out_dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, group_size, name)
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // self.group_size))
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return dispatch.w4a16_linear(x, self.weight, self.weight_scale, bias, self.out_dtype)


class W4A8Linear(_Int4Linear):
    """int8 activations x packed int4 weights with two-level scales (fp32 per row, integer per group);
    exact int32 accumulation, one fp32 rescale; output requantized to `out` when given, else `out_dtype`."""

    layout = W4A8

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, inp: ActQuant,
                 out: ActQuant | None, name: str = "linear", out_dtype: torch.dtype = torch.float16):
        super().__init__(in_features, out_features, bias, group_size, name)
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("group_scale", torch.ones(out_features, in_features // self.group_size,
                                                       dtype=GROUP_SCALE_DTYPE))
        self.inp, self.out, self.out_dtype = inp, out, out_dtype

    def forward(self, x: QTensor | torch.Tensor) -> QTensor | torch.Tensor:
        x = _as_codes(x, self.inp)
        bias = None if self.bias is None else self.bias.float()
        # a model's weights are written only between forwards: the GPU kernel may load them early
        linear = partial(dispatch.w4a8_linear, x.codes, x.scale, self.weight, self.weight_scale, self.group_scale,
                         bias, constant_weights=True)
        if self.out is not None and self.out.static:
            scale = self.out.scale_for(x.codes)
            return QTensor(linear(out_scale=scale), scale)
        if self.out is None:  # the kernel stores out_dtype directly (the fp32 value, then a cast)
            return linear(out_dtype=self.out_dtype)
        y = linear(out_dtype=torch.float32)
        return self.out(y)

    def project_and_convolve(self, x: QTensor | torch.Tensor, conv: nn.Module, state: torch.Tensor, start: int
                             ) -> tuple[QTensor, tuple[QTensor, torch.Tensor]] | None:
        """This projection with `conv`'s one-token step on its output channels start .. start + C (Mamba2's
        in_proj into conv1d) as one op, dispatch.w4a8_linear_conv_step: (output, (conv output, new
        state)), the same values as forward() then conv(output channels, state). None where they must
        run apart: a dynamic output scale, or a conv that cannot run inside another op (step_operands)."""
        operands = conv.step_operands() if isinstance(conv, QuantCausalConv1d) else None
        if operands is None or self.out is None or not self.out.static:
            return None
        x = _as_codes(x, self.inp)
        bias = None if self.bias is None else self.bias.float()
        scale = self.out.scale_for(x.codes)
        weight, w_scale, conv_bias, conv_scale = operands
        codes, conv_codes, new_state = dispatch.w4a8_linear_conv_step(
            x.codes, x.scale, self.weight, self.weight_scale, self.group_scale, bias, scale, start, weight, w_scale,
            conv_bias, conv_scale, state, constant_weights=True)
        return QTensor(codes, scale), (QTensor(conv_codes, conv_scale), new_state)


class Int4Embedding(nn.Module):
    """Token embedding with packed int4 rows and fp32 group scales (round to nearest); fp16 lookups."""

    def __init__(self, num: int, dim: int, group_size: int, name: str = "backbone.embeddings"):
        super().__init__()
        if dim % 2:
            raise SsmqError(f"{name}: int4 rows need an even embedding dimension, got {dim}")
        self.group_size = group_size_for(dim, group_size, name)
        self.name = name
        self.register_buffer("weight", torch.zeros(num, dim // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(num, dim // self.group_size))

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor) -> Int4Embedding:
        q = rtn(weight.float(), W4A16, self.group_size, self.name)
        self.weight.copy_(pack_int4(q.codes))
        self.weight_scale.copy_(q.scale)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dispatch.int4_embedding(ids, self.weight, self.weight_scale)
