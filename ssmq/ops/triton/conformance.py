"""The acceptance rule for kernel outputs against the reference ops (docs/numerics.md, section 6).

Integer codes must be identical on at least 99.99% of elements and never more than one step apart
(a kernel may round a value that lies within float tolerance of a .5 boundary the other way); float
outputs must be within 1e-3 relative error (norm of the difference over the norm of the reference).
Used by the interpreter tests and by benchmarks/gpu_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_CODE_MATCH = 0.9999
MAX_CODE_STEP = 1
FLOAT_RTOL = 1e-3


@dataclass
class Agreement:
    """How an output agrees with the reference: `match` (fraction of equal elements, for codes),
    `max_step` (largest code difference) or `rel_error` (for floats), and whether that passes."""

    kind: str
    match: float = 1.0
    max_step: int = 0
    rel_error: float = 0.0

    @property
    def ok(self) -> bool:
        if self.kind == "codes":
            return self.match >= MIN_CODE_MATCH and self.max_step <= MAX_CODE_STEP
        return self.rel_error <= FLOAT_RTOL

    def __str__(self) -> str:
        if self.kind == "codes":
            return f"codes: {100 * self.match:.4f}% equal, max step {self.max_step}"
        return f"float: rel error {self.rel_error:.2e}"


def agreement(out: torch.Tensor, ref: torch.Tensor) -> Agreement:
    """Compare a kernel output with the reference output (same shape; int8 codes or floats)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if ref.dtype == torch.int8 or out.dtype == torch.int8:
        if out.dtype != ref.dtype:
            raise AssertionError(f"dtype {out.dtype} != reference {ref.dtype}")
        diff = (out.to(torch.int32) - ref.to(torch.int32)).abs()
        match = 1.0 if diff.numel() == 0 else float((diff == 0).float().mean())
        return Agreement("codes", match=match, max_step=int(diff.max()) if diff.numel() else 0)
    o, r = out.double(), ref.double()
    if not bool(torch.isfinite(o).all()):
        return Agreement("float", rel_error=float("inf"))
    denom = r.norm()
    err = (o - r).norm() / denom if float(denom) > 0 else (o - r).norm()
    return Agreement("float", rel_error=float(err))
