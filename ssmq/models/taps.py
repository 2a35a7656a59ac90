"""Named taps: the quantization and tracing points of the forward, addressed by name.

The forward calls `taps(name, tensor)` at each point of DESIGN.md §3. With no hook registered that
is a dictionary look-up and nothing else. Calibration registers observers (hooks that return None),
precision plans register quantizers (hooks that return a replacement tensor), tracing registers
recorders; none of them touches the forward.

Tap names are `layers.{i}.{tap}` for block taps and `norm_f.out` at model level. Patterns use `*`
for any run of characters and `layers.A-B.` or `layers.A,B,C.` for layer ranges.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch

from ssmq.errors import SsmqError
from ssmq.ops.qtensor import QTensor

TapHook = Callable[[str, torch.Tensor], "torch.Tensor | None"]
TapValue = Union[torch.Tensor, QTensor]


@dataclass(frozen=True)
class TapSpec:
    """One tap of a block: its name, the tensor it sees (and that tensor's layout), whether a
    quantization scale belongs to it, and the key Quamba uses for the same point."""

    name: str
    tensor: str
    layout: str
    has_scale: bool = True
    quamba_key: str = ""


_SHARED = (
    TapSpec("norm.out", "RMSNorm output = in_proj input", "(batch, length, d_model)", True, "in_proj:input"),
)
_TRACE_TAIL = (
    TapSpec("mixer.out", "mixer output (out_proj output)", "(batch, length, d_model)", False),
    TapSpec("block.out", "residual stream after the block", "(batch, length, d_model)", False),
)

MAMBA1_TAPS: tuple[TapSpec, ...] = _SHARED + (
    TapSpec("in_proj.out", "x and z halves of the in_proj output", "(batch, length, 2*d_inner)", True,
            "in_proj:output"),
    TapSpec("conv.pre_act", "causal conv1d output before SiLU", "(batch, length, d_inner)", False),
    TapSpec("conv.out", "conv1d + SiLU output = x_proj input = SSM input u", "(batch, length, d_inner)", True,
            "x_proj:input"),
    TapSpec("x_proj.out", "x_proj output: dt_low, B, C", "(batch, length, dt_rank+2*d_state)", True,
            "x_proj:output"),
    TapSpec("dt_proj.out", "delta before bias and softplus", "(batch, length, d_inner)", True, "dt_proj:output"),
    TapSpec("ssm.state", "final SSM state", "(batch, d_inner, d_state)", True, "ssm_state_act:input"),
    TapSpec("ssm.y", "scan output with D skip and z gate", "(batch, length, d_inner)", False),
    TapSpec("out_proj.in", "gated SSM output after the out_proj rotation", "(batch, length, d_inner)", True,
            "out_proj:input"),
) + _TRACE_TAIL

MAMBA2_TAPS: tuple[TapSpec, ...] = _SHARED + (
    TapSpec("in_proj.z", "gate segment of in_proj output", "(batch, length, d_inner)", True, "in_proj:output"),
    TapSpec("in_proj.x", "x segment of in_proj output", "(batch, length, d_inner)", True, "in_proj:output"),
    TapSpec("in_proj.B", "B segment of in_proj output", "(batch, length, ngroups*d_state)", True, "in_proj:output"),
    TapSpec("in_proj.C", "C segment of in_proj output", "(batch, length, ngroups*d_state)", True, "in_proj:output"),
    TapSpec("in_proj.dt", "dt segment of in_proj output (before bias and softplus)", "(batch, length, nheads)",
            True, "in_proj:output"),
    TapSpec("conv.pre_act", "causal conv1d output on x|B|C before SiLU", "(batch, length, conv_dim)", False),
    TapSpec("conv.x", "conv1d + SiLU output, x part = SSD input x", "(batch, length, d_inner)", True,
            "x_conv_out"),
    TapSpec("conv.B", "conv1d + SiLU output, B part", "(batch, length, ngroups*d_state)", True, "B_conv_out"),
    TapSpec("conv.C", "conv1d + SiLU output, C part", "(batch, length, ngroups*d_state)", True, "C_conv_out"),
    TapSpec("ssm.state", "final SSD state", "(batch, nheads, headdim, d_state)", True, "ssm_state_act:input"),
    TapSpec("ssm.y", "SSD output with D skip, before the gated norm", "(batch, length, d_inner)", False),
    TapSpec("out_proj.in", "gated RMSNorm output after the out_proj rotation", "(batch, length, d_inner)", True,
            "out_proj:input"),
) + _TRACE_TAIL

MODEL_TAPS: tuple[TapSpec, ...] = (
    TapSpec("norm_f.out", "final norm output = lm_head input", "(batch, length, d_model)", True, "lm_head:input"),
)


def block_taps(arch: str) -> tuple[TapSpec, ...]:
    """The per-block taps of an architecture ('mamba1' or 'mamba2')."""
    return MAMBA1_TAPS if arch == "mamba1" else MAMBA2_TAPS


def tap_names(arch: str, n_layer: int) -> list[str]:
    """Every tap name of a model, in forward order."""
    names = [f"layers.{i}.{spec.name}" for i in range(n_layer) for spec in block_taps(arch)]
    return names + [spec.name for spec in MODEL_TAPS]


def spec_of(arch: str, name: str) -> TapSpec:
    """The TapSpec of a full tap name such as 'layers.3.conv.out'."""
    local = re.sub(r"^layers\.\d+\.", "", name)
    for spec in block_taps(arch) + MODEL_TAPS:
        if spec.name == local:
            return spec
    raise SsmqError(f"unknown tap {name!r}")


def layer_of(name: str) -> int | None:
    """The block index of a tap name, or None for model-level taps."""
    m = re.match(r"^layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a tap pattern: `*` matches any characters, and a layer field may be N, A-B or A,B,C."""
    if not pattern or any(c.isspace() for c in pattern):
        raise SsmqError(f"malformed tap pattern {pattern!r}")
    parts = pattern.split(".")
    out = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "layers" and part != "*":
            layers: list[int] = []
            for item in part.split(","):
                m = _RANGE.match(item)
                if m:
                    lo, hi = int(m.group(1)), int(m.group(2))
                    if lo > hi:
                        raise SsmqError(f"malformed layer range {item!r} in tap pattern {pattern!r}")
                    layers.extend(range(lo, hi + 1))
                elif item.isdigit():
                    layers.append(int(item))
                else:
                    raise SsmqError(f"malformed layer field {part!r} in tap pattern {pattern!r}")
            out.append("(?:" + "|".join(str(n) for n in layers) + ")")
        else:
            out.append(".*".join(re.escape(s) for s in part.split("*")))
    return re.compile(r"\.".join(out) + r"\Z")


def match_taps(pattern: str, names: Iterable[str]) -> list[str]:
    """The names matching `pattern`; an error listing close matches when none does."""
    names = list(names)
    regex = compile_pattern(pattern)
    hits = [n for n in names if regex.match(n)]
    if not hits:
        close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
        local = sorted({re.sub(r"^layers\.\d+\.", "layers.*.", n) for n in names})
        hint = f"close matches: {', '.join(close)}" if close else f"valid taps: {', '.join(local)}"
        raise SsmqError(f"tap pattern {pattern!r} matches no tap; {hint}")
    return hits


class TapHandle:
    """Returned by `Taps.add`; `remove()` unregisters the hook."""

    def __init__(self, taps: Taps, names: list[str], hook: TapHook):
        self._taps, self.names, self._hook = taps, names, hook

    def remove(self) -> None:
        for name in self.names:
            hooks = self._taps._hooks.get(name, [])
            if self._hook in hooks:
                hooks.remove(self._hook)
                if not hooks:
                    del self._taps._hooks[name]


class Taps:
    """The tap registry of one model: the names it has and the hooks registered on them."""

    def __init__(self, names: list[str]):
        self.names: tuple[str, ...] = tuple(names)
        self._hooks: dict[str, list[TapHook]] = {}

    def __call__(self, name: str, x: TapValue) -> TapValue:
        """Pass `x` through the hooks registered on `name`; a hook returning a tensor replaces x.

        Hooks always see real values: a QTensor (int8 codes + scale) is shown to them dequantized."""
        if self._hooks:
            for hook in self._hooks.get(name, ()):
                out = hook(name, x.dequantize() if isinstance(x, QTensor) else x)
                if out is not None:
                    x = out
        return x

    def add(self, pattern: str, hook: TapHook) -> TapHandle:
        """Register `hook` on every tap matching `pattern`; hooks run in registration order."""
        names = match_taps(pattern, self.names)
        for name in names:
            self._hooks.setdefault(name, []).append(hook)
        return TapHandle(self, names, hook)

    @contextmanager
    def hooked(self, pattern: str, hook: TapHook) -> Iterator[TapHandle]:
        """Register `hook` for the duration of a with-block."""
        handle = self.add(pattern, hook)
        try:
            yield handle
        finally:
            handle.remove()

    def has_hook(self, name: str) -> bool:
        """Whether a hook listens on tap `name`: when none does, a module may compute through that point
        in one fused kernel, since nothing can see or replace the intermediate value."""
        return name in self._hooks

    def active(self) -> list[str]:
        """Names that currently have hooks."""
        return list(self._hooks)
