"""int8 token embedding with one abs-max scale per row, and the matching int8 lm_head.

A row of the embedding is a row (an output channel) of lm_head, so with tied embeddings one set of
codes and row scales serves both: a lookup dequantizes rows, lm_head uses them as per-channel weights.
"""

from __future__ import annotations

import torch

from ssmq.ops.int8_linear import int8_linear, quantize_weight, weight_only_linear
from ssmq.ops.quantize import ScaleLike, check_int8, check_scale


def quantize_embedding(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (vocab, d) int8, row scales (vocab,) fp32), each row's scale max(amax_row / 127, 1e-6)."""
    return quantize_weight(weight, per_channel=True)


def int8_embedding(ids: torch.Tensor, codes: torch.Tensor, row_scales: torch.Tensor,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Rows of the int8 table for token ids (...): codes[ids] * row_scales[ids] in fp32, cast to out_dtype."""
    check_int8(codes, "embedding codes")
    scales = check_scale(row_scales, "row_scales").to(codes.device)
    return (codes[ids].float() * scales[ids].unsqueeze(-1)).to(out_dtype)


def int8_lm_head(x: torch.Tensor, codes: torch.Tensor, row_scales: torch.Tensor,
                 x_scale: ScaleLike | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits (..., vocab) from int8 lm_head weights (vocab, d) with per-row scales.

    W8A8 when x_scale is given (x is then int8 codes, e.g. the `norm_f.out` quantization), else W8A16
    (x is float). Logits default to fp32.
    """
    if x_scale is None:
        return weight_only_linear(x, codes, row_scales, out_dtype=out_dtype)
    return int8_linear(x, x_scale, codes, row_scales, out_dtype=out_dtype)
