"""Scale rules: which observer feeds which scale, chosen by tap-name patterns (DESIGN §3).

A rule is `PATTERN=OBSERVER`. Patterns are the tap patterns of `ssmq.models.taps` (`*` for any
characters; `layers.A-B.` or `layers.A,B,C.` for layers) and are matched against the taps that carry
a scale. Rules apply in order: a later rule overrides an earlier one on the taps both match. A
pattern that matches no tap is an error listing the valid names.

Observers (parameters are optional; shown with their defaults):
  minmax                          running max of |x|, one value per tensor
  minmax(per=channel)             one value per channel
  minmax(groups=N)                one value per group of N contiguous channel runs
  grouped_minmax(head_groups=4, channel_groups=4)
                                  Mamba2: x as [SSD group, head group, channel group], B and C
                                  per SSD group, ssm.state per SSD group and state index
  percentile(alpha=0.9995, sigma=0.01)
                                  per document quantile(|x|, alpha), EMA over documents with sigma;
                                  `percentile(0.9999)` is short for `percentile(alpha=0.9999)`

Presets are named rule lists; the default is the architecture's (quamba1 or quamba2). Rules given
by a user are applied on top of the default preset unless the list starts with a preset name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssmq.errors import SsmqError
from ssmq.models.taps import compile_pattern, layer_of
from ssmq.quant.observers import check_alpha_sigma

_PARAMS: dict[str, dict[str, tuple[type, Any]]] = {
    "minmax": {"per": (str, "tensor"), "groups": (int, None)},
    "grouped_minmax": {"head_groups": (int, 4), "channel_groups": (int, 4)},
    "percentile": {"alpha": (float, 0.9995), "sigma": (float, 0.01)},
}
_POSITIONAL = {"percentile": "alpha"}
_SPEC = re.compile(r"^([A-Za-z_]\w*)\s*(?:\((.*)\))?$")


@dataclass(frozen=True)
class ObserverSpec:
    """An observer kind with all its parameters (defaults filled in); `str()` is its canonical text."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str) -> Any:
        return dict(self.params)[key]

    def __str__(self) -> str:
        shown = [(k, v) for k, v in self.params if v is not None and not (k == "per" and v == "tensor")]
        return self.kind + (f"({', '.join(f'{k}={v}' for k, v in shown)})" if shown else "")


def _value(kind: str, key: str, text: str) -> Any:
    typ = _PARAMS[kind][key][0]
    try:
        value = typ(text)
    except ValueError:
        raise SsmqError(f"{kind}: parameter {key}={text!r} is not a valid {typ.__name__}") from None
    if typ is int and value < 1:
        raise SsmqError(f"{kind}: parameter {key} must be >= 1, got {value}")
    return value


def parse_observer(text: str) -> ObserverSpec:
    """Parse e.g. 'percentile(alpha=0.9999)' into a spec; errors name the bad part."""
    m = _SPEC.match(text.strip())
    if not m:
        raise SsmqError(f"malformed observer {text!r}; expected NAME or NAME(key=value, ...)")
    kind, args = m.group(1), m.group(2)
    if kind not in _PARAMS:
        raise SsmqError(f"unknown observer {kind!r}; known observers: {', '.join(_PARAMS)}")
    given: dict[str, Any] = {}
    for i, arg in enumerate(a.strip() for a in (args or "").split(",")):
        if not arg:
            if args and args.strip():
                raise SsmqError(f"malformed observer {text!r}: empty argument")
            continue
        key, sep, value = (s.strip() for s in arg.partition("="))
        if not sep:
            if i > 0 or kind not in _POSITIONAL:
                raise SsmqError(f"malformed observer {text!r}: write arguments as key=value")
            key, value = _POSITIONAL[kind], arg
        if key not in _PARAMS[kind]:
            raise SsmqError(f"{kind}: unknown parameter {key!r}; known: {', '.join(_PARAMS[kind])}")
        if key in given:
            raise SsmqError(f"malformed observer {text!r}: {key} given twice")
        given[key] = _value(kind, key, value)
    params = {k: given.get(k, default) for k, (_, default) in _PARAMS[kind].items()}
    if kind == "percentile":
        check_alpha_sigma(params["alpha"], params["sigma"])
    if kind == "minmax":
        if params["per"] not in ("tensor", "channel"):
            raise SsmqError(f"minmax: per must be 'tensor' or 'channel', got {params['per']!r}")
        if params["groups"] is not None and "per" in given:
            raise SsmqError("minmax: give either per= or groups=, not both")
    return ObserverSpec(kind, tuple(params.items()))


@dataclass(frozen=True)
class Rule:
    pattern: str
    observer: ObserverSpec

    def __str__(self) -> str:
        return f"{self.pattern}={self.observer}"


def parse_rule(text: str) -> Rule:
    """Parse 'PATTERN=OBSERVER'."""
    pattern, sep, spec = text.partition("=")
    pattern = pattern.strip()
    if not sep or not pattern or not spec.strip():
        raise SsmqError(f"malformed rule {text!r}; expected PATTERN=OBSERVER, "
                        "e.g. 'layers.*.conv.out=percentile(alpha=0.9995)'")
    if any(c.isspace() for c in pattern):
        raise SsmqError(f"malformed rule {text!r}: the pattern contains whitespace")
    return Rule(pattern, parse_observer(spec))


def describe_taps(taps: Sequence[str]) -> str:
    """Tap names listed compactly: 'layers.0-23.{norm.out, conv.out}, norm_f.out'."""
    layers = sorted({i for i in map(layer_of, taps) if i is not None})
    local = list(dict.fromkeys(re.sub(r"^layers\.\d+\.", "", t) for t in taps if layer_of(t) is not None))
    parts = [f"layers.{layers[0]}-{layers[-1]}.{{{', '.join(local)}}}"] if layers else []
    return ", ".join(parts + [t for t in taps if layer_of(t) is None])


@dataclass(frozen=True)
class Preset:
    arch: str | None
    rules: tuple[str, ...]
    description: str


PRESETS: dict[str, Preset] = {
    "quamba1": Preset("mamba1", (
        "*=minmax",
        "layers.*.conv.out=percentile(alpha=0.9995, sigma=0.01)",
        "layers.*.ssm.state=percentile(alpha=0.9995, sigma=0.01)",
    ), "Quamba (W8A8 Mamba1): percentile for the SSM input and state, minmax elsewhere (DESIGN §3)"),
    "quamba2": Preset("mamba2", (
        "*=minmax",
        "layers.*.conv.x=grouped_minmax(head_groups=4, channel_groups=4)",
        "layers.*.conv.B=grouped_minmax",
        "layers.*.conv.C=grouped_minmax",
        "layers.*.ssm.state=grouped_minmax",
    ), "Quamba2-style Mamba2 scales, contiguous groups (no channel reordering): grouped x, B, C "
       "and state, minmax elsewhere"),
    "minmax": Preset(None, ("*=minmax",), "minmax for every tap"),
}
DEFAULT_PRESET = {"mamba1": "quamba1", "mamba2": "quamba2"}
# A preset's version for another architecture, where its idea carries over (the taps differ).
ARCH_VARIANTS: dict[tuple[str, str], Preset] = {
    ("quamba1", "mamba2"): Preset("mamba2", (
        "*=minmax",
        "layers.*.conv.x=percentile(alpha=0.9995, sigma=0.01)",
        "layers.*.ssm.state=percentile(alpha=0.9995, sigma=0.01)",
    ), "Quamba's per-tensor scales on Mamba2: percentile for the SSD input x (conv.x) and the state, "
       "minmax elsewhere"),
}


class RuleSet:
    """Rules and preset names as given (syntax checked at once), resolved against a model later."""

    def __init__(self, items: str | Sequence[str] | None = None):
        texts = [items] if isinstance(items, str) else list(items or [])
        self.entries: list[str | Rule] = []
        for text in texts:
            for part in re.split(r"[;\n]", text):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part and part in PRESETS:
                    self.entries.append(part)
                elif "=" not in part and _SPEC.match(part):
                    raise SsmqError(f"unknown preset {part!r}; presets: {', '.join(PRESETS)} "
                                    "(a rule is PATTERN=OBSERVER)")
                else:
                    self.entries.append(parse_rule(part))

    def rules(self, arch: str) -> list[Rule]:
        """The rule list for an architecture: presets expanded, the default preset first unless the
        list starts with a preset."""
        entries = self.entries
        if not entries or not isinstance(entries[0], str):
            entries = [DEFAULT_PRESET[arch], *entries]
        out: list[Rule] = []
        for entry in entries:
            if isinstance(entry, Rule):
                out.append(entry)
                continue
            preset = ARCH_VARIANTS.get((entry, arch), PRESETS[entry])
            if preset.arch not in (None, arch):
                raise SsmqError(f"preset {entry!r} is for {preset.arch} models; this model is {arch} "
                                f"(use {DEFAULT_PRESET[arch]!r})")
            out.extend(parse_rule(r) for r in preset.rules)
        return out

    def assign(self, arch: str, taps: Sequence[str]) -> dict[str, tuple[ObserverSpec, Rule]]:
        """For every tap, the observer chosen by the last rule matching it, and that rule."""
        chosen: dict[str, tuple[ObserverSpec, Rule]] = {}
        for rule in self.rules(arch):
            regex = compile_pattern(rule.pattern)
            hits = [t for t in taps if regex.match(t)]
            if not hits:
                raise SsmqError(f"rule '{rule}' matches no tap; taps with a scale: {describe_taps(taps)}")
            for name in hits:
                chosen[name] = (rule.observer, rule)
        missing = [t for t in taps if t not in chosen]
        if missing:
            raise SsmqError(f"no rule covers tap {missing[0]!r} (and {len(missing) - 1} more); add '*=minmax'")
        return {t: chosen[t] for t in taps}
