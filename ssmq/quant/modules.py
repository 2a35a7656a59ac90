"""Quantized drop-in modules: same call signatures as the fp ones in ssmq.models.layers, int8 inside.

Each module quantizes its own output to the scale of the tap it feeds (as a fused kernel would) and
reads that scale from the ScaleBook at forward time, by name; a consumer reads the producer's scale
from the QTensor it receives. So every logical scale exists once, and editing it reaches every user.
Weights are int8 buffers with their weight scales; they are built from an fp module by `from_float`
or left empty (to be filled by a checkpoint) when built from shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import partial

import torch
from torch import nn

from ssmq.models.taps import Taps
from ssmq.ops import dispatch as ops
from ssmq.ops.int8_embedding import quantize_embedding
from ssmq.ops.int8_linear import quantize_weight
from ssmq.ops.quantize import scale_from_amax
from ssmq.ops.qtensor import QTensor
from ssmq.quant.scalebook import ScaleBook


class ActQuant:
    """How one activation is quantized: to the static scale `name` of a ScaleBook, or dynamically
    (one scale per row of the last dimension, from its abs max, at run time) when `name` is None."""

    def __init__(self, book: ScaleBook | None, name: str | None):
        self.book, self.name = book, name

    @property
    def static(self) -> bool:
        return self.name is not None

    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        """The scale to quantize x with: the book's value (on the model's device, see
        QuantizedMambaLM.to), or x's per-row abs-max scale."""
        if self.name is not None:
            return self.book[self.name]
        return scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True).float())

    def __call__(self, x: torch.Tensor) -> QTensor:
        scale = self.scale_for(x)
        return QTensor(ops.quantize(x, scale), scale)


def _as_codes(x: QTensor | torch.Tensor, q: ActQuant) -> QTensor:
    """Inputs that arrive in float (e.g. after an fp module) are quantized with the consumer's quantizer."""
    return x if isinstance(x, QTensor) else q(x)


class QuantRMSNorm(nn.Module):
    """Residual add + RMSNorm + quantization to the `norm.out` scale: the call of ssmq.models.layers.RMSNorm
    ((hidden, residual) -> (normed, new residual)) with the normed value as int8 codes."""

    def __init__(self, dim: int, eps: float, out: ActQuant, residual_in_fp32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.out, self.residual_in_fp32 = eps, out, residual_in_fp32

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[QTensor, torch.Tensor]:
        if not self.out.static:
            normed, stored = ops.add_rms_norm(hidden, residual, self.weight.float(), self.eps, self.residual_in_fp32)
            return self.out(normed), stored
        scale = self.out.scale_for(hidden)
        codes, stored = ops.int8_add_rms_norm(hidden, residual, self.weight, self.eps, scale, self.residual_in_fp32)
        return QTensor(codes, scale), stored


class W8A8Linear(nn.Module):
    """int8 activations x int8 weights, exact int32 accumulation, one fp32 rescale; the output is
    requantized to the `out` scale when given, else returned in `out_dtype`."""

    adds_bias = True

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool,
                 inp: ActQuant, out: ActQuant | None, out_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.inp, self.out, self.out_dtype = inp, out, out_dtype

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor, bias: torch.Tensor | None) -> W8A8Linear:
        codes, scale = quantize_weight(weight.float(), per_channel=self.weight_scale.numel() > 1)
        self.weight.copy_(codes)
        self.weight_scale.copy_(scale.reshape(-1))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.float())
        return self

    def forward(self, x: QTensor | torch.Tensor) -> QTensor | torch.Tensor:
        x = _as_codes(x, self.inp)
        bias = self.bias.float() if self.bias is not None and self.adds_bias else None
        # a model's weights are written only between forwards: the GPU kernel may load them early
        linear = partial(ops.int8_linear, x.codes, x.scale, self.weight, self.weight_scale, bias, constant_weights=True)
        if self.out is not None and self.out.static:
            scale = self.out.scale_for(x.codes)
            return QTensor(linear(out_scale=scale), scale)
        if self.out is None:  # the kernel stores out_dtype directly (the same rounding as fp32, then a cast)
            return linear(out_dtype=self.out_dtype)
        y = linear(out_dtype=torch.float32)
        return self.out(y)


class W8A8DeltaProjection(W8A8Linear):
    """Quantized dt_proj: the matmul alone; its fp `bias` is added inside the scan, before softplus."""

    adds_bias = False


class QuantCausalConv1d(nn.Module):
    """int8 depthwise causal conv1d + SiLU, output quantized to the `conv.out` scale. The decode state
    holds the last k-1 int8 input codes (static) or their dequantized values (dynamic scales)."""

    def __init__(self, channels: int, kernel: int, bias: bool, per_channel: bool, out: ActQuant,
                 taps: Taps, prefix: str):
        super().__init__()
        self.register_buffer("weight", torch.zeros(channels, 1, kernel, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(channels if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.out, self.taps, self.pre_act_tap = out, taps, prefix + "conv.pre_act"

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor, bias: torch.Tensor | None) -> QuantCausalConv1d:
        codes, scale = quantize_weight(weight[:, 0].float(), per_channel=self.weight_scale.numel() > 1)
        self.weight.copy_(codes.unsqueeze(1))
        self.weight_scale.copy_(scale.reshape(-1))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.float())
        return self

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight codes (C, k), weight scale (0-d or (C,)), fp32 bias or None) as the ops take them."""
        w_scale = self.weight_scale if self.weight_scale.numel() > 1 else self.weight_scale[0]
        return self.weight[:, 0], w_scale, None if self.bias is None else self.bias.float()

    def step_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
        """(weight codes, weight scale, fp32 bias, output scale) for running the conv, SiLU and quantization
        as one op: this module's forward, or a producer's that runs the conv's one-token step inside its
        own op (W4A8Linear.project_and_convolve). None where they must run apart: dynamic scales, or a hook
        on `conv.pre_act`, which must see the pre-activation."""
        if not self.out.static or self.taps.has_hook(self.pre_act_tap):
            return None
        return (*self._operands(), self.out.scale_for(self.weight))

    def forward(self, x: QTensor, state: torch.Tensor | None) -> tuple[QTensor, torch.Tensor]:
        """Static scales: int8 conv on the codes, state = int8 codes; conv, SiLU and quantization are one
        fused op unless a hook listens on `conv.pre_act`. Dynamic (per-token input scales): the codes are
        dequantized first and the state holds fp32 inputs."""
        fused = self.step_operands()
        if fused is not None:
            weight, w_scale, bias, scale = fused
            codes, new_state = ops.int8_causal_conv1d_silu(x.codes, x.scale, weight, w_scale, bias, scale, state)
            return QTensor(codes, scale), new_state
        weight, w_scale, bias = self._operands()
        if self.out.static:
            pre, new_state = ops.int8_causal_conv1d(x.codes, x.scale, weight, w_scale, bias, state)
        else:
            w = ops.dequantize(weight, w_scale.reshape(-1, 1))
            pre, new_state = ops.causal_conv1d(x.dequantize(), w, bias, state)
        pre = self.taps(self.pre_act_tap, pre)
        return self.out(nn.functional.silu(pre)), new_state


class QuantSelectiveScan(nn.Module):
    """Selective scan on int8 u, delta, B, C, z (fp32 recurrence, fp16 output); the final state is
    quantized to the `ssm.state` scale and kept as int8 codes in the decode cache."""

    def __init__(self, state: ActQuant, z: ActQuant):
        super().__init__()
        self.state, self.z = state, z

    def forward(self, u: QTensor, delta: QTensor, A: torch.Tensor, B: QTensor, C: QTensor, D: torch.Tensor,
                z: QTensor | torch.Tensor, delta_bias: torch.Tensor,
                state: QTensor | None) -> tuple[torch.Tensor, QTensor]:
        z = _as_codes(z, self.z)
        if self.state.static:
            scale = self.state.scale_for(u.codes)
            y, codes = ops.int8_selective_scan(
                u.codes, u.scale, delta.codes, delta.scale, A, B.codes, B.scale, C.codes, C.scale, scale,
                D=D.float(), z_q=z.codes, z_scale=z.scale, delta_bias=delta_bias.float(),
                state_q=None if state is None else state.codes)
            return y, QTensor(codes, scale)
        y, last = ops.selective_scan(u.dequantize(), delta.dequantize(), A, B.dequantize(), C.dequantize(),
                                       D.float(), z.dequantize(), delta_bias.float(), True,
                                       None if state is None else state.dequantize())
        return y.to(torch.float16), self.state(last)


class Deferred(ABC):
    """A module's output not computed yet, so that its consumer can compute it fused with its own op
    (QuantHadamard: Mamba2's gated norm, rotation and quantization as one kernel). A consumer that cannot
    fuse asks for `value()`."""

    @abstractmethod
    def value(self) -> torch.Tensor:
        """The output itself."""

    @abstractmethod
    def rotate_quantize(self, scale: torch.Tensor) -> torch.Tensor:
        """int8 codes of quantize(hadamard_transform(value()), scale)."""


class QuantHadamard(nn.Module):
    """The online rotation before out_proj (or the identity) followed by quantization to `out_proj.in`
    (one fused op with a static scale; with a Deferred input that offers it, the producer's op too)."""

    def __init__(self, rotate: bool, out: ActQuant):
        super().__init__()
        self.rotate, self.out = rotate, out

    def forward(self, y: torch.Tensor | Deferred) -> QTensor:
        if self.out.static and self.rotate and isinstance(y, Deferred):
            scale = self.out.scale_for(None)
            return QTensor(y.rotate_quantize(scale), scale)
        if isinstance(y, Deferred):
            y = y.value()
        if self.out.static:
            scale = self.out.scale_for(y)
            return QTensor(ops.hadamard_quantize(y, scale, self.rotate), scale)
        return self.out(ops.hadamard_transform(y.float()) if self.rotate else y.float())


class QuantEmbedding(nn.Module):
    """int8 embedding rows with per-row abs-max scales; lookups return fp16 rows."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num, dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num))

    @torch.no_grad()
    def load_float(self, weight: torch.Tensor) -> QuantEmbedding:
        codes, scale = quantize_embedding(weight.float())
        self.weight.copy_(codes)
        self.weight_scale.copy_(scale.reshape(-1))
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.int8_embedding(ids, self.weight, self.weight_scale)
