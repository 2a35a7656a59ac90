"""Editing the scales of a quantized checkpoint into a new one: `set_scales` (a value, a factor, or the
values of another checkpoint) and `derive_scales` (another observer policy, from saved calibration
statistics, without running the model).

Every scale exists once (`scales.<name>` in model.safetensors), so an edit reaches every consumer.
The new directory is written atomically; every other tensor and file is copied unchanged; each
edited scale's log gets who / when / what / old -> new, and quant_config.json's `edits` list records
the operation. The source directory is never written.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ssmq.errors import SsmqError
from ssmq.models.checkpoint import SAFETENSORS, atomic_directory
from ssmq.quant.inspect import ScaleSource, check_stats, open_scales, value_summary
from ssmq.quant.qmodel import QUANT_CONFIG
from ssmq.quant.rules import Rule, parse_rule
from ssmq.quant.stats import CalibrationStats, scale_from_stats


def check_factor(value: float, what: str) -> float:
    """A value or factor for a scale: a finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SsmqError(f"{what} must be a finite number > 0, got {value}")
    return float(value)


def _editable(model: str | Path) -> ScaleSource:
    source = open_scales(model)
    if source.format != "ssmq":
        raise SsmqError(f"{source.path}: only ssmq checkpoints can be edited (this is a {source.format} checkpoint)")
    return source


def check_output(source: str | Path, output: str | Path) -> None:
    """Refuse an output that is the source directory or lies inside it."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if out == src or src in out.parents:
        raise SsmqError(f"{output}: the output directory is the input checkpoint {source} (or inside it); "
                        "choose a new directory, the source is never modified")


def _write(source: ScaleSource, output: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Copy `source` to `output`, with its (edited) scale book and the edit record."""
    src = Path(source.path)
    qc = {**source.quant_config, "scales": source.book.metadata()}
    qc["edits"] = [*qc.get("edits", []), record]
    with safe_open(str(src / SAFETENSORS), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update(source.book.tensors())
    with atomic_directory(output, overwrite) as tmp:
        for item in src.iterdir():
            if item.name in (SAFETENSORS, QUANT_CONFIG):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / SAFETENSORS), metadata=metadata)
        (tmp / QUANT_CONFIG).write_text(json.dumps(qc, indent=2) + "\n")


def _edit(model: str | Path, output: str | Path, overwrite: bool, op: str, what: str,
          apply: Callable[[ScaleSource], list[str]]) -> dict[str, Any]:
    """Check the output, apply the edits in memory (all validation happens here), then write."""
    check_output(model, output)
    source = _editable(model)
    old = {n: source.book[n].clone() for n in source.book}
    names = apply(source)
    record = {"who": getpass.getuser(), "when": _dt.datetime.now(_dt.timezone.utc).isoformat(), "op": op,
              "what": what, "source": str(model), "scales": names}
    _write(source, Path(output), record, overwrite)
    changes = [{"name": n, "old": value_summary(old[n]), "new": value_summary(source.book[n])} for n in names]
    return {"source": str(model), "output": str(output), "op": op, "what": what, "changes": changes}


def set_scales(model: str | Path, output: str | Path, scale: str, *, value: float | None = None,
               multiply: float | None = None, from_model: str | Path | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Write a copy of checkpoint `model` to `output` where the scales matching the pattern `scale` are
    set to `value`, multiplied by `multiply`, or taken from checkpoint `from_model`. Returns the changes."""
    given = [k for k, v in (("value", value), ("multiply", multiply), ("from", from_model)) if v is not None]
    if len(given) != 1:
        raise SsmqError(f"give exactly one of value, multiply or from (got {', '.join(given) or 'none'})")
    if value is not None:
        check_factor(value, "value")
        what = f"{scale} = {value}"
    elif multiply is not None:
        check_factor(multiply, "factor")
        what = f"{scale} x {multiply}"
    else:
        other = open_scales(from_model)
        what = f"{scale} from {from_model}"

    def apply(source: ScaleSource) -> list[str]:
        names = source.book.match(scale)
        if from_model is not None:
            missing = [n for n in names if n not in other.book]
            if missing:
                raise SsmqError(f"{from_model}: has no scale {missing[0]!r} ({len(missing)} of {len(names)} missing)")
        for name in names:
            if value is not None:
                new = torch.full_like(source.book[name], value)
            elif multiply is not None:
                new = source.book[name] * multiply
            else:
                new = other.book[name]
            source.book.set(name, new, reason=f"set {what}")
        return names

    return _edit(model, output, overwrite, "set", what, apply)


def derive_scales(model: str | Path, stats: str | Path | CalibrationStats, rules: list[str] | tuple[str, ...],
                  output: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a copy of checkpoint `model` to `output` whose scales matched by `rules` ('PATTERN=OBSERVER',
    later rules win) are re-derived from calibration statistics of the same model. No model run."""
    parsed = [parse_rule(r) for r in rules]
    if not parsed:
        raise SsmqError("give at least one rule, e.g. 'layers.*.conv.out=percentile(0.9999)'")
    stats = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)

    def apply(source: ScaleSource) -> list[str]:
        check_stats(stats, source)
        chosen: dict[str, Rule] = {}
        for rule in parsed:
            chosen.update({n: rule for n in source.book.match(rule.pattern)})
        for name, rule in chosen.items():
            scale, summary = scale_from_stats(stats, name, rule)
            entry = source.book.entry(name)
            if scale.shape != entry.value.shape:
                raise SsmqError(f"rule {rule}: the observer gives {name} a scale of shape {tuple(scale.shape)}, "
                                f"but the checkpoint's modules use shape {tuple(entry.value.shape)}")
            source.book.set(name, scale, reason=f"derive {rule}")
            entry.observer, entry.params, entry.stats = rule.observer.kind, dict(rule.observer.params), summary
        return list(chosen)

    return _edit(model, output, overwrite, "derive", "; ".join(map(str, parsed)), apply)
