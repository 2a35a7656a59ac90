"""The calibration statistics store: per tap, what choosing its scale needs now and re-deriving it
later under another rule needs, without running the model again.

Per tap it keeps the element count; the per-channel max of |x| (its max is the true max |x|, and
every minmax variant, per tensor, per channel or grouped, follows from it exactly); the quantile of
|x| of every calibration document at a grid of α (so a percentile rule at a grid α and any σ is
re-derived exactly); a histogram of |x| (to estimate any other percentile and the fraction a scale
clips, within one bin, see `ssmq.quant.histogram`); and the observer chosen by the rules with its value.

On disk, a directory: `stats.safetensors` (tensors named `TAP/field`) and `stats.json` (format,
grid, provenance of the calibration, and per tap its observer and a summary).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssmq.errors import SsmqError
from ssmq.models.checkpoint import atomic_directory
from ssmq.models.config import MambaConfig
from ssmq.ops.quantize import MIN_SCALE, QMAX
from ssmq.quant.histogram import MANTISSA_BITS, RELATIVE_BIN_WIDTH, Histogram
from ssmq.quant.observers import contiguous_groups, ema_update, mamba2_grouping
from ssmq.quant.rules import ObserverSpec, Rule, parse_observer

FORMAT = "ssmq-calibration-stats"
VERSION = 1
STATS_JSON = "stats.json"
STATS_TENSORS = "stats.safetensors"
DEFAULT_ALPHAS = (0.99, 0.999, 0.9995, 0.9999, 0.99999, 1.0)
DEFAULT_SIGMA = 0.01
_FIELDS = ("channel_absmax", "sample_quantiles", "histogram", "value")


def minmax_value(spec: ObserverSpec, tap: str, channel_absmax: torch.Tensor, cfg: MambaConfig) -> torch.Tensor:
    """The value of a minmax-family observer, from the per-channel maxima of its tap."""
    if spec.kind == "grouped_minmax":
        return mamba2_grouping(tap, cfg, spec.param("head_groups"), spec.param("channel_groups")).apply(channel_absmax)
    groups = spec.param("groups")
    if groups is not None:
        if channel_absmax.dim() != 1:
            raise SsmqError(f"{tap}: minmax(groups=...) needs one channel axis; this tap's channels have "
                            f"shape {tuple(channel_absmax.shape)}")
        return contiguous_groups(channel_absmax.numel(), groups, tap).apply(channel_absmax)
    return channel_absmax.clone() if spec.param("per") == "channel" else channel_absmax.amax()


def derive_value(spec: ObserverSpec, tap: str, channel_absmax: torch.Tensor, sample_quantiles: torch.Tensor,
                 alphas: tuple[float, ...], cfg: MambaConfig) -> torch.Tensor:
    """The value of any observer, from a tap's per-channel maxima and per-document grid quantiles.
    Exact for minmax variants and for percentiles at a grid α (any σ)."""
    if spec.kind != "percentile":
        return minmax_value(spec, tap, channel_absmax, cfg)
    alpha = spec.param("alpha")
    if alpha not in alphas:
        raise SsmqError(f"{tap}: alpha {alpha} is not in the stored grid ({', '.join(map(str, alphas))}); "
                        "calibrate again with a rule using it, or use estimate_quantile")
    return percentile_value(sample_quantiles, alphas.index(alpha), spec.param("sigma"))


def percentile_value(sample_quantiles: torch.Tensor, column: int, sigma: float) -> torch.Tensor:
    """The EMA, in document order, of the per-document quantiles of one grid column."""
    m = None
    for p in sample_quantiles[:, column].tolist():
        m = ema_update(m, p, sigma)
    return torch.tensor(m, dtype=torch.float32)


@dataclass
class TapStats:
    """What calibration recorded for one tap."""

    name: str
    observer: ObserverSpec
    count: int
    channel_absmax: torch.Tensor     # float32, per channel
    sample_quantiles: torch.Tensor   # float32 (documents, alphas)
    histogram: Histogram
    value: torch.Tensor              # float32, the observer's value: a scalar or one per group/channel

    @property
    def absmax(self) -> float:
        return float(self.channel_absmax.max())

    def scale(self, qmax: int = 127) -> torch.Tensor:
        """value / qmax, never below MIN_SCALE (DESIGN §3)."""
        return (self.value / qmax).clamp(min=MIN_SCALE)


@dataclass
class CalibrationStats:
    """Statistics of every scale tap of one model, with the provenance of the calibration run."""

    config: MambaConfig
    alphas: tuple[float, ...]
    sigma: float
    taps: dict[str, TapStats]
    provenance: dict[str, Any]
    seconds: float | None = field(default=None, compare=False)  # duration of the run; not saved

    def tap(self, name: str) -> TapStats:
        if name not in self.taps:
            close = difflib.get_close_matches(name, list(self.taps), n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise SsmqError(f"no statistics for tap {name!r}{hint}")
        return self.taps[name]

    def derive(self, name: str, observer: ObserverSpec | str) -> torch.Tensor:
        """The value `observer` would have produced on this tap, from the stored statistics alone
        (see `derive_value`)."""
        spec = parse_observer(observer) if isinstance(observer, str) else observer
        t = self.tap(name)
        return derive_value(spec, name, t.channel_absmax, t.sample_quantiles, self.alphas, self.config)

    def estimate_quantile(self, name: str, alpha: float) -> float:
        """The α-quantile of |x| over all calibration tokens pooled, estimated from the histogram."""
        t = self.tap(name)
        return t.histogram.estimate_quantile(alpha, t.absmax)

    def clipped_fraction(self, name: str, scale: float, qmax: int = 127) -> float:
        """Estimated fraction of calibration values with |x| > qmax·scale (outside the int8 range)."""
        t = self.tap(name)
        return t.histogram.fraction_above(qmax * scale, t.absmax)

    def summary(self) -> dict[str, Any]:
        """Per tap: observer, count, true max, EMA of the grid quantiles (σ = self.sigma), value, scale."""
        out = {}
        for name, t in self.taps.items():
            ema = {str(a): float(percentile_value(t.sample_quantiles, i, self.sigma))
                   for i, a in enumerate(self.alphas)}
            out[name] = {"observer": str(t.observer), "count": t.count, "absmax": t.absmax, "quantile_ema": ema,
                         "value": t.value.tolist(), "scale": t.scale().tolist()}
        return out

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write atomically (temporary directory, then rename); refuse a non-empty one unless overwrite."""
        tensors = {}
        taps_meta = {}
        summary = self.summary()
        for name, t in self.taps.items():
            tensors.update({f"{name}/channel_absmax": t.channel_absmax, f"{name}/sample_quantiles": t.sample_quantiles,
                            f"{name}/histogram": t.histogram.compact_counts(), f"{name}/value": t.value})
            taps_meta[name] = {**summary[name], "histogram_offset": t.histogram.offset}
        meta = {"format": FORMAT, "version": VERSION, "alphas": list(self.alphas), "sigma": self.sigma,
                "histogram": {"bins": "float32 bit pattern, log2-spaced", "mantissa_bits": MANTISSA_BITS,
                              "relative_bin_width": RELATIVE_BIN_WIDTH},
                "config": self.config.to_dict(), "provenance": self.provenance, "taps": taps_meta}
        with atomic_directory(Path(directory), overwrite) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATS_TENSORS),
                      metadata={"format": FORMAT})
            (tmp / STATS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> CalibrationStats:
        """Read a statistics directory; a missing or extra tensor is an error that names it."""
        directory = Path(directory)
        meta_path, tensor_path = directory / STATS_JSON, directory / STATS_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SsmqError(f"{directory}: not a calibration statistics directory (needs {STATS_JSON} and "
                            f"{STATS_TENSORS})")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # JSON and safetensors raise several types for a bad file
            raise SsmqError(f"{directory}: unreadable statistics ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SsmqError(f"{meta_path}: not {FORMAT} version {VERSION}")
        expected = {f"{name}/{f}" for name in meta["taps"] for f in _FIELDS}
        mismatched = sorted(expected ^ set(tensors))
        if mismatched:
            key = mismatched[0]
            raise SsmqError(f"{tensor_path}: {'missing' if key in expected else 'unexpected'} tensor {key!r}")
        taps = {}
        for name, info in meta["taps"].items():
            taps[name] = TapStats(name, parse_observer(info["observer"]), info["count"],
                                  tensors[f"{name}/channel_absmax"], tensors[f"{name}/sample_quantiles"],
                                  Histogram(tensors[f"{name}/histogram"], info["histogram_offset"]),
                                  tensors[f"{name}/value"])
        return cls(MambaConfig(**meta["config"]), tuple(meta["alphas"]), meta["sigma"], taps, meta["provenance"])


def stats_model_sha256(stats: CalibrationStats) -> str | None:
    """The sha256 of the (untransformed) source model the statistics were collected on."""
    return (stats.provenance.get("model") or {}).get("sha256")


def check_stats_source(stats: CalibrationStats, model_sha256: str | None, transforms: list[str] | tuple[str, ...],
                       what: str) -> None:
    """Refuse statistics collected on another model than `what` (sha256 `model_sha256`), or under other
    fp-equivalent transforms than `transforms`."""
    found = stats_model_sha256(stats)
    if model_sha256 is None or found != model_sha256:
        raise SsmqError(f"statistics were collected on another model (model sha256 {found}; {what} has "
                        f"{model_sha256}); calibrate that model")
    used = list(stats.provenance.get("transforms", []))
    if used != list(transforms):
        raise SsmqError(f"statistics were collected with transforms {used}; {what} needs {list(transforms)} "
                        f"(calibrate with the same --recipe)")


def scale_from_stats(stats: CalibrationStats, name: str, rule: Rule) -> tuple[torch.Tensor, dict[str, Any]]:
    """The scale `rule`'s observer gives tap `name` from saved statistics (value / 127, at least 1e-6),
    and the statistics summary recorded with it."""
    value = stats.derive(name, rule.observer)
    scale = (value / QMAX).clamp(min=MIN_SCALE).float()
    tap = stats.tap(name)
    summary = {"rule": str(rule), "absmax": tap.absmax, "count": tap.count,
               "clipped_fraction": stats.clipped_fraction(name, float(scale.max()))}
    return scale, summary
