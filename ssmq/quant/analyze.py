"""Per-layer analysis of a quantized model's scales (`analyze_scales`, `ssmq scales analyze`).

Per layer, the conv1d scale chain: the conv input scale x_scale (`in_proj.out`; Mamba2 `in_proj.x`),
wx_scale = conv weight scale · x_scale (the factor that turns the int32 conv accumulator into the
pre-activation), the conv output scale x_out_scale (`conv.out`; Mamba2 `conv.x`, grouped) and the
ratio x_out_scale / wx_scale. For a grouped Mamba2 x_out_scale, `groups` gives all four as
[SSD group, head group, channel group] tables (Quamba2's x_out_scales layout): x_scale and wx_scale of a
group are the largest over its channels (equal to the per-tensor value when that is what the model has).

With the calibration statistics of the same model, per scale: the fraction of calibration values
it clips (|x| > 127·s), the INT8 range utilisation (99.9th percentile of |x| / (127·s)), and the
SQNR of quantizing the calibration activations with this scale and with the min-max scale. These
come from the stored |x| histograms, each bin's values taken as spread evenly over the bin (the
assumption the statistics store makes, see ssmq.quant.histogram), with the symmetric range ±127.
For a grouped scale the pooled statistics are compared with its largest group scale (the clipped
fraction is then a lower bound), and the number of groups whose max |x| exceeds 127·s_group is
exact (from the per-channel maxima); SQNR needs one scale and is not given for grouped scales.

The pre- vs post-SiLU range of the conv output is not in the statistics: it is measured by running
the quantized model over the first calibration documents with a hook on the `conv.pre_act` tap
(pre = the fp32 pre-activation the int8 conv computes, post = SiLU(pre), before output quantization).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssmq.data import file_sha256, is_jsonl, read_jsonl_texts, tokenizer_sha256
from ssmq.errors import SsmqError
from ssmq.models.tokenizer import TOKENIZER_FILE, load_tokenizer
from ssmq.ops.quantize import QMAX
from ssmq.quant.inspect import ModelRef, ScaleSource, check_stats, open_scales, value_summary
from ssmq.quant.mamba2_modules import channel_scale
from ssmq.quant.observers import mamba2_grouping
from ssmq.quant.qmodel import QuantizedMambaLM, load_quantized
from ssmq.quant.rules import ObserverSpec
from ssmq.quant.stats import CalibrationStats

CONV_TAPS = {"mamba1": ("in_proj.out", "conv.out"), "mamba2": ("in_proj.x", "conv.x")}
MINMAX_KINDS = ("minmax", "grouped_minmax")
UTILISATION_QUANTILE = 0.999
EDGE_TOLERANCE = 1e-6  # |x| within this relative distance of 127·s is not clipped (fp32 rounding of max / 127)


def _round_integral(u: np.ndarray) -> np.ndarray:
    """G(u) = ∫_{-1/2}^{u} (v - round(v))² dv (periodic sawtooth squared: 1/12 per unit)."""
    k = np.floor(u + 0.5)
    f = u - k
    return k / 12 + (f ** 3 + 0.125) / 3


def sqnr_db(counts: np.ndarray, lower: np.ndarray, upper: np.ndarray, absmax: float, scale: float) -> float:
    """SQNR (dB) of q = clamp(round(x / s), ±127) on a histogram of |x|, values spread evenly in each bin.

    Signal: Σ x². Noise: the rounding error (x - s·round(x / s))² below 127.5·s, the clipping error
    (x - 127·s)² above it; both integrated exactly over each bin."""
    hi = np.minimum(upper, absmax)
    lo = np.minimum(lower, hi)
    width = hi - lo
    edge, top = (QMAX + 0.5) * scale, QMAX * scale
    a, b = np.minimum(lo, edge), np.minimum(hi, edge)
    rounding = scale ** 3 * (_round_integral(b / scale) - _round_integral(a / scale))
    c, d = np.maximum(lo, edge), np.maximum(hi, edge)
    clipping = ((d - top) ** 3 - (c - top) ** 3) / 3
    spread = width > 0
    safe = np.where(spread, width, 1.0)
    signal = np.where(spread, (lo ** 2 + lo * hi + hi ** 2) / 3, lo ** 2)
    point_error = np.where(lo <= edge, lo - scale * np.round(lo / scale), lo - top) ** 2
    noise = np.where(spread, (rounding + clipping) / safe, point_error)
    total_noise = float((counts * noise).sum())
    if total_noise == 0:
        return math.inf
    return 10 * math.log10(float((counts * signal).sum()) / total_noise)


def _conv_row(source: ScaleSource, layer: int) -> dict[str, Any] | None:
    """x_scale, conv weight scale, wx_scale, x_out_scale and their ratio for one layer."""
    x_tap, out_tap = (f"layers.{layer}.{t}" for t in CONV_TAPS[source.arch])
    w = source.conv_weight_scales.get(layer)
    if x_tap not in source.book or out_tap not in source.book or w is None:
        return None
    x, out = source.book[x_tap], source.book[out_tap]
    wx = w * x
    ratio = out / wx if wx.numel() == 1 or out.numel() == 1 or out.shape == wx.shape else None
    groups = _group_tables(source, x_tap, x, w, out)
    if groups is not None:
        ratio = torch.tensor(groups["ratio"])
    return {"layer": layer, "x_scale": value_summary(x), "w_scale": value_summary(w), "wx_scale": value_summary(wx),
            "x_out_scale": value_summary(out), "ratio": None if ratio is None else value_summary(ratio),
            "groups": groups}


def _group_tables(source: ScaleSource, x_tap: str, x: torch.Tensor, w: torch.Tensor,
                  out: torch.Tensor) -> dict[str, list[Any]] | None:
    """x_scale, wx_scale, x_out_scale and x_out / wx as [SSD group, head group, channel group] nested lists,
    for a Mamba2 layer whose conv.x scale is grouped; None otherwise."""
    cfg = source.config
    if cfg is None or cfg.arch != "mamba2" or out.dim() != 3:
        return None
    grouping = mamba2_grouping(x_tap.replace("in_proj.x", "conv.x"), cfg, out.shape[1], out.shape[2])
    x_c = channel_scale(x_tap, x, cfg).expand(cfg.d_inner)
    w_c = channel_scale(x_tap, w.reshape(-1) if w.numel() > 1 else w, cfg).expand(cfg.d_inner)
    x_g, wx_g = grouping.apply(x_c), grouping.apply(w_c * x_c)
    return {"x_scale": x_g.tolist(), "wx_scale": wx_g.tolist(), "x_out_scale": out.tolist(),
            "ratio": (out / wx_g).tolist()}


def _scale_row(source: ScaleSource, stats: CalibrationStats, name: str) -> dict[str, Any]:
    """Clipping, INT8 utilisation and SQNR of one scale on the calibration statistics."""
    entry = source.book.entry(name)
    tap = stats.tap(name)
    s = float(entry.value.max())
    row: dict[str, Any] = {"name": name, "tap": name.split(".", 2)[-1], "scale": value_summary(entry.value),
                           "grouped": entry.value.numel() > 1, "absmax": tap.absmax,
                           "clipped": stats.clipped_fraction(name, s * (1 + EDGE_TOLERANCE)),
                           "utilisation": stats.estimate_quantile(name, UTILISATION_QUANTILE) / (QMAX * s),
                           "groups_clipping": None, "sqnr_db": None, "sqnr_minmax_db": None}
    counts, lower, upper = tap.histogram.bins()
    row["sqnr_minmax_db"] = sqnr_db(counts, lower, upper, tap.absmax, max(tap.absmax / QMAX, 1e-6))
    if entry.value.numel() == 1:
        row["sqnr_db"] = sqnr_db(counts, lower, upper, tap.absmax, s)
    elif entry.observer in MINMAX_KINDS:
        group_max = stats.derive(name, ObserverSpec(entry.observer, tuple(entry.params.items())))
        if group_max.shape == entry.value.shape:
            over = group_max > QMAX * entry.value * (1 + EDGE_TOLERANCE)
            row["groups_clipping"] = [int(over.sum()), over.numel()]
    return row


def _calibration_docs(source: ScaleSource, stats: CalibrationStats, docs: int) -> tuple[list[list[int]] | None, str]:
    """Token ids of the first `docs` calibration documents, re-read from the recorded data file, or
    None and the reason they cannot be."""
    data = stats.provenance.get("data") or {}
    path = Path(data.get("file", ""))
    if data.get("kind") not in ("jsonl-documents", "text-windows"):
        return None, f"calibration data of kind {data.get('kind')!r} cannot be re-read"
    if not path.is_file() or file_sha256(path) != data.get("sha256"):
        return None, f"calibration data file {path} is missing or has changed"
    tok_path = Path(source.path) / TOKENIZER_FILE
    if not tok_path.is_file():
        return None, f"{source.path} has no {TOKENIZER_FILE}"
    tok = load_tokenizer(tok_path)
    recorded = (stats.provenance.get("tokenizer") or {}).get("sha256")
    if recorded is not None and tokenizer_sha256(tok) != recorded:
        return None, f"{tok_path} is not the tokenizer the statistics were collected with"
    indices, seqlen = data["indices"][:docs], data["seqlen"]
    if is_jsonl(path):
        texts = read_jsonl_texts(path)
        return [tok.encode(texts[i]).ids[:seqlen] for i in indices], ""
    stream = tok.encode(path.read_text(encoding="utf-8")).ids
    return [stream[w * seqlen:(w + 1) * seqlen] for w in indices], ""


@torch.no_grad()
def conv_ranges(qm: QuantizedMambaLM, docs: list[list[int]]) -> list[dict[str, Any]]:
    """Per layer, min and max of the conv pre-activation and of SiLU of it over the documents."""
    seen: dict[str, list[float]] = {}

    def hook(name: str, pre: torch.Tensor) -> None:
        post = torch.nn.functional.silu(pre.float())
        new = [pre.min().item(), pre.max().item(), post.min().item(), post.max().item()]
        old = seen.get(name, new)
        seen[name] = [min(old[0], new[0]), max(old[1], new[1]), min(old[2], new[2]), max(old[3], new[3])]

    with qm.taps.hooked("layers.*.conv.pre_act", hook):
        for ids in docs:
            qm.backbone(torch.tensor([ids], device=qm.device), None)
    return [{"layer": int(name.split(".")[1]), "pre_min": v[0], "pre_max": v[1], "post_min": v[2], "post_max": v[3]}
            for name, v in seen.items()]


def analyze_scales(model: ModelRef, stats: str | Path | CalibrationStats | None = None, plot: str | Path | None = None,
                   docs: int = 4, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Per-layer conv scale chain; with `stats` (of the same model) also clipping, INT8 utilisation,
    SQNR vs min-max and the pre/post-SiLU conv ranges over the first `docs` calibration documents.
    With `plot`, a PNG of the per-layer scales and clipping."""
    source = open_scales(model)
    if docs < 0:
        raise SsmqError(f"docs must be >= 0, got {docs}")
    result: dict[str, Any] = {"source": source.path, "arch": source.arch, "notes": [],
                              "layers": [r for r in (_conv_row(source, i) for i in range(source.n_layer)) if r]}
    if not result["layers"]:
        result["notes"].append("no conv scale chain (the model has no static conv input/output scales)")
    if stats is not None:
        stats = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
        check_stats(stats, source)
        result["scales"] = [_scale_row(source, stats, n) for n in source.book.names()]
        ids, reason = _calibration_docs(source, stats, docs) if docs else (None, "docs=0")
        if ids is None:
            result["notes"].append(f"pre/post-SiLU ranges not measured: {reason}")
        else:
            qm = model if isinstance(model, QuantizedMambaLM) else load_quantized(Path(source.path), device)
            result["conv_ranges"] = conv_ranges(qm, ids)
            result["conv_ranges_docs"] = len(ids)
    if plot is not None:
        result["plot"] = str(plot_analysis(result, Path(plot)))
    return result


def _series(values: list[float | dict[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    """(max, min) per layer of scalar or grouped values (NaN where missing)."""
    def pick(v: float | dict[str, Any] | None, key: str) -> float:
        return math.nan if v is None else v[key] if isinstance(v, dict) else v
    return np.array([pick(v, "max") for v in values]), np.array([pick(v, "min") for v in values])


def plot_analysis(result: dict[str, Any], path: Path) -> Path:
    """A PNG with one panel per view: conv scales, their ratio, clipping per tap, pre/post-SiLU range.
    Grouped scales are drawn as their max with a band down to their min."""
    from matplotlib.figure import Figure  # imported here: only plotting needs matplotlib
    from matplotlib.ticker import MaxNLocator

    if not path.parent.is_dir():
        raise SsmqError(f"{path}: directory {path.parent} does not exist")
    rows = result["layers"]
    layers = [r["layer"] for r in rows]
    panels = ["scales", "ratio"] + ["clipping"] * ("scales" in result) + ["silu"] * bool(result.get("conv_ranges"))
    fig = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel in ("scales", "ratio"):
            keys = ("x_scale", "wx_scale", "x_out_scale") if panel == "scales" else ("ratio",)
            for key in keys:
                top, bottom = _series([r[key] for r in rows])
                grouped = not np.array_equal(top, bottom, equal_nan=True)
                (line,) = ax.plot(layers, top, marker="o", label=f"{key} (max, band to min)" if grouped else key)
                if grouped:
                    ax.fill_between(layers, bottom, top, alpha=0.2, color=line.get_color())
            ax.set_yscale("log" if panel == "scales" else "linear")
            ax.set_ylabel("scale" if panel == "scales" else "x_out / wx")
        elif panel == "clipping":
            for tap in dict.fromkeys(r["tap"] for r in result["scales"]):
                points = [(int(r["name"].split(".")[1]), 100 * r["clipped"]) for r in result["scales"]
                          if r["tap"] == tap and r["name"].startswith("layers.")]
                if points:
                    ax.plot(*zip(*points), marker=".", label=tap)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylabel("clipped (%)")
        else:
            ranges = result["conv_ranges"]
            at = [r["layer"] for r in ranges]
            ax.fill_between(at, [r["pre_min"] for r in ranges], [r["pre_max"] for r in ranges], alpha=0.3,
                            label="pre-SiLU")
            ax.fill_between(at, [r["post_min"] for r in ranges], [r["post_max"] for r in ranges], alpha=0.5,
                            label="post-SiLU")
            ax.set_ylabel("conv output range")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{result['source']} ({result['arch']})", fontsize="medium")
    fig.savefig(path, format="png", dpi=100)
    return path
