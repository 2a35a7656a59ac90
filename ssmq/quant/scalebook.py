"""The scale book: every logical activation scale of a quantized model, stored once under its tap name.

Quantized modules hold the book and the name of each scale they use and read the value at forward
time, so an edit (or a temporary override) reaches every consumer at once. Each entry carries its
provenance: the observer and parameters that produced it, a statistics summary, and an edit log.
"""

from __future__ import annotations

import copy
import difflib
import datetime as _dt
import getpass
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ssmq.errors import SsmqError
from ssmq.models.taps import match_taps
from ssmq.ops.quantize import check_scale

TENSOR_PREFIX = "scales."


@dataclass
class ScaleEntry:
    """One logical scale and where it came from."""

    value: torch.Tensor
    observer: str
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)

    def describe_value(self) -> str:
        v = self.value
        if v.numel() == 1:
            return f"{v.item():.6g}"
        return f"shape {tuple(v.shape)} min {v.min().item():.4g} mean {v.mean().item():.4g} max {v.max().item():.4g}"


def _summary(value: torch.Tensor) -> float | list[Any]:
    return value.item() if value.numel() == 1 else value.tolist()


class ScaleBook:
    """Ordered mapping tap name -> ScaleEntry, with validation, edit logging and temporary overrides."""

    def __init__(self, entries: Mapping[str, ScaleEntry] | None = None):
        self._entries: dict[str, ScaleEntry] = {}
        for name, entry in (entries or {}).items():
            check_scale(entry.value, name)
            self._entries[name] = entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> list[tuple[str, ScaleEntry]]:
        return list(self._entries.items())

    def entry(self, name: str) -> ScaleEntry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else f"; {len(self)} scales exist (ssmq scales list)"
            raise SsmqError(f"unknown scale {name!r}{hint}") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.entry(name).value

    def __setitem__(self, name: str, value: torch.Tensor | float) -> None:
        self.set(name, value)

    def set(self, name: str, value: torch.Tensor | float, reason: str = "set") -> None:
        """Replace a scale's value (same shape), validate it, and log the edit (who, what, old -> new)."""
        entry = self.entry(name)
        new = torch.as_tensor(value, dtype=torch.float32).to(entry.value.device)
        if new.numel() == 1 and entry.value.numel() == 1:
            new = new.reshape(entry.value.shape)
        if new.shape != entry.value.shape:
            raise SsmqError(f"scale {name!r} has shape {tuple(entry.value.shape)}; got {tuple(new.shape)}")
        check_scale(new, name)
        entry.edits.append({"who": getpass.getuser(), "when": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                            "what": reason, "old": _summary(entry.value), "new": _summary(new)})
        entry.value.copy_(new)

    def match(self, pattern: str) -> list[str]:
        """Scale names matching a tap pattern; an error listing close matches when none does."""
        return match_taps(pattern, self._entries)

    @contextmanager
    def override(self, values: Mapping[str, torch.Tensor | float]) -> Iterator[ScaleBook]:
        """Temporarily replace scales (for A/B evaluation without writing files); restored on exit,
        and nothing is added to the edit logs."""
        saved = {name: (self.entry(name).value.clone(), copy.deepcopy(self.entry(name).edits)) for name in values}
        try:
            for name, value in values.items():
                self.set(name, value, reason="override")
            yield self
        finally:
            for name, (value, edits) in saved.items():
                self._entries[name].value.copy_(value)
                self._entries[name].edits = edits

    def to(self, device: torch.device | str) -> ScaleBook:
        """Move every value to `device` (fp32 kept), so modules on that device read their scales without
        a host-to-device copy per call; later edits and overrides write into the moved tensors."""
        for entry in self._entries.values():
            entry.value = entry.value.to(device)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The scale tensors as checkpoint entries (`scales.<name>`), fp32 on CPU."""
        return {TENSOR_PREFIX + n: e.value.detach().float().cpu().contiguous() for n, e in self._entries.items()}

    def metadata(self) -> dict[str, dict[str, Any]]:
        """Per-scale provenance for quant_config.json."""
        return {n: {"observer": e.observer, "params": e.params, "stats": e.stats, "edits": e.edits,
                    "shape": list(e.value.shape)} for n, e in self._entries.items()}

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Mapping[str, Any]],
                        source: str) -> ScaleBook:
        """Rebuild a book from `scales.*` tensors and their metadata; both sides must name the same scales."""
        names = {k[len(TENSOR_PREFIX):] for k in tensors if k.startswith(TENSOR_PREFIX)}
        for missing in sorted(set(metadata) - names):
            raise SsmqError(f"{source}: scale {missing!r} is described in quant_config.json but has no tensor")
        for extra in sorted(names - set(metadata)):
            raise SsmqError(f"{source}: tensor 'scales.{extra}' has no entry in quant_config.json")
        entries = {}
        for name, meta in metadata.items():
            entries[name] = ScaleEntry(tensors[TENSOR_PREFIX + name].float(), meta.get("observer", "unknown"),
                                       dict(meta.get("params", {})), dict(meta.get("stats", {})),
                                       list(meta.get("edits", [])))
        return cls(entries)
