"""4-bit weights: signed int4 codes, group-wise scales, packed storage (docs/numerics.md, "4-bit weights").

    codes  int8 tensor with values in [-8, 7], symmetric (no zero point), shape (N, K)
    groups contiguous runs of `group` columns along the input dimension K: group = 128, or K when K <= 128
    packed uint8 (N, K/2): byte j of row n = (code[n, 2j] & 0xF) | (code[n, 2j+1] & 0xF) << 4

Two scale layouts share the codes:
- W4A16: one fp32 scale per (row, group), shape (N, K/group); w = code * scale.
- W4A8 (two levels): an fp32 scale per row s_c (N,) and a positive integer per (row, group) g in
  [1, 127] (int16, shape (N, K/group)); w = s_c * (g * code), so g * code is an exact integer in
  [-1016, 1016] and an int8 x int4 product can be summed in int32 before any fp32 scale is applied.
"""

from __future__ import annotations

import torch

from ssmq.errors import SsmqError
from ssmq.ops.quantize import MIN_SCALE, check_scale

INT4_MIN, INT4_MAX = -8, 7
DEFAULT_GROUP_SIZE = 128
GROUP_SCALE_MAX = 127  # largest integer group scale of the W4A8 layout
GROUP_SCALE_DTYPE = torch.int16


def group_size_for(k: int, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight") -> int:
    """The group size used for an input dimension of `k`: `group_size`, or k itself when k <= group_size
    (one group per output channel). SsmqError naming `name` when k is not a multiple of it."""
    if group_size < 1:
        raise SsmqError(f"{name}: group size must be >= 1, got {group_size}")
    if k <= group_size:
        return k
    if k % group_size:
        raise SsmqError(f"{name}: input dimension K={k} is not a multiple of the int4 group size {group_size} "
                        f"(K must be <= {group_size} or divisible by it)")
    return group_size


def check_int4(codes: torch.Tensor, name: str) -> None:
    """SsmqError unless `codes` is an int8 tensor holding values in [-8, 7] only."""
    if codes.dtype != torch.int8:
        raise TypeError(f"{name} must be int8 tensor of int4 codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < INT4_MIN or int(codes.max()) > INT4_MAX):
        raise SsmqError(f"{name}: int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], "
                        f"got values in [{int(codes.min())}, {int(codes.max())}]")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes (..., K) (int8 in [-8, 7], K even) into uint8 (..., K/2): the even column in the
    low nibble, the odd column in the high nibble, each as 4-bit two's complement."""
    check_int4(codes, "int4 codes")
    k = codes.shape[-1]
    if k % 2:
        raise SsmqError(f"int4 packing needs an even number of columns, got K={k} (pad K to even)")
    nibbles = (codes.to(torch.int16) & 0xF)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 codes (..., 2*K2) in [-8, 7] from packed uint8 (..., K2); the inverse of pack_int4."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed int4 weights must be uint8, got {packed.dtype}")
    b = packed.to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def groups_of(k: int, n_groups: int, name: str) -> int:
    """The group size implied by K columns and `n_groups` scale columns; SsmqError if they do not fit."""
    if n_groups < 1 or k % n_groups:
        raise SsmqError(f"{name}: {n_groups} group scale columns do not divide K={k} into equal groups")
    return k // n_groups


def expand_groups(per_group: torch.Tensor, k: int) -> torch.Tensor:
    """(N, G) per-group values repeated along K to (N, K): column k reads group k // (K / G)."""
    return per_group.repeat_interleave(k // per_group.shape[-1], dim=-1)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, name: str = "w_scale") -> torch.Tensor:
    """W4A16 weights in fp32: code[n, k] * scale[n, k // group] (one fp32 product per element)."""
    s = check_scale(scale, name).to(codes.device)
    groups_of(codes.shape[-1], s.shape[-1], name)
    return codes.float() * expand_groups(s, codes.shape[-1])


def effective_int_weight(codes: torch.Tensor, group_scale: torch.Tensor) -> torch.Tensor:
    """The W4A8 integer weight g[n, k // group] * code[n, k] (int32, |value| <= 1016)."""
    groups_of(codes.shape[-1], group_scale.shape[-1], "group_scale")
    return codes.to(torch.int32) * expand_groups(group_scale.to(torch.int32), codes.shape[-1])


def check_group_scale(group_scale: torch.Tensor, name: str = "group_scale") -> None:
    """SsmqError unless the W4A8 integer group scales are an integer tensor with values in [1, 127]."""
    if group_scale.dtype.is_floating_point or group_scale.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {group_scale.dtype}")
    if group_scale.numel() and (int(group_scale.min()) < 1 or int(group_scale.max()) > GROUP_SCALE_MAX):
        raise SsmqError(f"{name}: integer group scales must lie in [1, {GROUP_SCALE_MAX}], "
                        f"got values in [{int(group_scale.min())}, {int(group_scale.max())}]")


def round_to_int4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int4 codes clamp(round_half_even(w / scale), -8, 7), one fp32 division per element;
    `scale` broadcasts against w."""
    return torch.round(w.float() / scale).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)


def group_scales_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The abs-max int4 group scale max(amax / 7, 1e-6) in fp32."""
    return torch.clamp(amax.float() / INT4_MAX, min=MIN_SCALE)


def two_level_channel_scale(fp_group_scale: torch.Tensor) -> torch.Tensor:
    """Level 1 of the W4A8 layout: s_c[n] = max over the row's groups of its fp group scale, / 127, so the
    largest group of each row gets the integer group scale 127 (the finest grid of group scales)."""
    return fp_group_scale.float().amax(dim=-1) / GROUP_SCALE_MAX


def integer_group_scales(fp_group_scale: torch.Tensor, channel_scale: torch.Tensor) -> torch.Tensor:
    """Level 2: g = clamp(round_half_even(fp_group_scale / s_c), 1, 127) as int16 (fp_group_scale (..., G),
    channel_scale broadcasting against it)."""
    return torch.round(fp_group_scale.float() / channel_scale).clamp_(1, GROUP_SCALE_MAX).to(GROUP_SCALE_DTYPE)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest W4A16 quantization of w (N, K): (codes int8 (N, K) in [-8, 7],
    fp32 scales (N, K/group)), scale = max(amax_group / 7, 1e-6)."""
    n, k = w.shape
    g = group_size_for(k, group_size, name)
    wf = w.detach().float().reshape(n, k // g, g)
    scale = group_scales_from_amax(wf.abs().amax(dim=-1))
    return round_to_int4(wf, scale[..., None]).reshape(n, k), scale


def quantize_int4_two_level(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest W4A8 quantization of w (N, K): (codes int8 (N, K), channel scales s_c fp32 (N,),
    integer group scales g int16 (N, K/group)). The fp group scales max(amax_group / 7, 1e-6) become
    s_c = max_groups / 127 and g = clamp(round(scale / s_c), 1, 127); codes = clamp(round(w / (s_c * g)), -8, 7)."""
    n, k = w.shape
    g = group_size_for(k, group_size, name)
    wf = w.detach().float().reshape(n, k // g, g)
    fp_scale = group_scales_from_amax(wf.abs().amax(dim=-1))
    s_c = two_level_channel_scale(fp_scale)
    gs = integer_group_scales(fp_scale, s_c[:, None])
    codes = round_to_int4(wf, (s_c[:, None] * gs.float())[..., None]).reshape(n, k)
    return codes, s_c, gs


def int4_embedding(ids: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Rows of a W4A16 table (packed (vocab, d/2), fp32 group scales (vocab, d/group)) for token ids (...):
    code * scale in fp32, cast to out_dtype."""
    return gather_int4_rows(ids, packed, check_scale(scale, "embedding row scales").to(packed.device), out_dtype)


def gather_int4_rows(ids: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """int4_embedding with `scale` already validated and on packed's device (the GPU route checks it once,
    not on every call)."""
    rows = unpack_int4(packed[ids])
    groups_of(rows.shape[-1], scale.shape[-1], "embedding row scales")
    return (rows.float() * expand_groups(scale[ids], rows.shape[-1])).to(out_dtype)
