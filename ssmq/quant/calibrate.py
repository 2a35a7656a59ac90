"""Calibration: run a model over text with a recorder on every scale tap, then give each tap the
value of the observer its rule names.

A calibration sample is one document. With batch size 1 (the default, as in Quamba) the
`ssm.state` tap sees each document's final state. Larger batches are right-padded; recorders read
only each document's own positions (exact: the model is causal), and the step size dt is set to
-inf on padded positions (softplus(-inf) = 0), so the SSM state stays frozen after a document ends
and the state tap still sees the state at the document's last token. Results then do not depend on
padding (they may differ from batch size 1 in the last bits, as batched matmuls round differently).

For the same model, data, rules, batch size and device the statistics are bit-identical.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import ssmq
from ssmq.api import load
from ssmq.data import CalibrationData, load_calibration_data, tokenizer_sha256
from ssmq.errors import SsmqError
from ssmq.models.checkpoint import state_dict_sha256
from ssmq.models.config import MambaConfig
from ssmq.models.device import parse_device, parse_dtype
from ssmq.models.lm import MambaLM
from ssmq.models.taps import TapHook, layer_of, spec_of
from ssmq.models.tokenizer import check_vocab_fits, load_tokenizer
from ssmq.quant.histogram import Histogram, NUM_BINS, bin_counts, nonfinite_count, rank_floor
from ssmq.quant.observers import (STATE_TAP, MinMaxObserver, channel_reduce_dims, check_alpha_sigma, local_name,
                                  lowest_rank, quantiles)
from ssmq.quant.rules import ObserverSpec, RuleSet
from ssmq.quant.stats import DEFAULT_ALPHAS, DEFAULT_SIGMA, CalibrationStats, TapStats, derive_value, minmax_value

log = logging.getLogger(__name__)

_DT_TAP = {"mamba1": "layers.*.dt_proj.out", "mamba2": "layers.*.in_proj.dt"}


@dataclass
class _Batch:
    """The documents of the forward in progress: positions in the data, lengths, padding mask."""

    positions: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    pad_mask: torch.Tensor | None = None


def scale_taps(model: MambaLM) -> list[str]:
    """The taps of `model` that carry a quantization scale, in forward order."""
    return [n for n in model.taps.names if spec_of(model.config.arch, n).has_scale]


def _sample(x: torch.Tensor, row: int, length: int, name: str) -> torch.Tensor:
    """One document's part of a tap tensor: its valid positions, or its state."""
    return x[row] if local_name(name) == STATE_TAP else x[row, :length]


class TapRecorder:
    """The hook on one tap: feeds each document's part of the tensor to the store's observers
    (per-channel max, histogram, per-document quantiles at the grid of α)."""

    def __init__(self, name: str, arch: str, data: CalibrationData, alphas: tuple[float, ...],
                 device: torch.device, batch: _Batch):
        self.name, self.data, self.alphas, self.batch = name, data, alphas, batch
        self.channel_max = MinMaxObserver(channel_reduce_dims(arch, name))
        self.histogram = torch.zeros(NUM_BINS, dtype=torch.int64, device=device)
        self.sample_quantiles = torch.zeros(data.n, len(alphas), dtype=torch.float32, device=device)
        self.count = 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        for row, (pos, length) in enumerate(zip(self.batch.positions, self.batch.lengths)):
            sample = _sample(x, row, length, name)
            absx = sample.detach().float().abs().reshape(-1)
            counts = bin_counts(absx)
            if int(nonfinite_count(counts)):
                layer = layer_of(name)
                where = f"layer {layer}" if layer is not None else "model level"
                raise SsmqError(f"non-finite activation (NaN or Inf) at tap {name} ({where}), "
                                f"{self.data.describe(pos)}")
            self.channel_max.observe(sample)
            self.histogram += counts
            floor = rank_floor(counts, lowest_rank(absx.numel(), self.alphas))
            self.sample_quantiles[pos] = quantiles(absx, self.alphas, floor)
            self.count += absx.numel()

    def finish(self, spec: ObserverSpec, cfg: MambaConfig) -> TapStats:
        channel_absmax = self.channel_max.result().cpu()
        sample_quantiles = self.sample_quantiles.cpu()
        value = derive_value(spec, self.name, channel_absmax, sample_quantiles, self.alphas, cfg)
        return TapStats(self.name, spec, self.count, channel_absmax, sample_quantiles,
                        Histogram.from_dense(self.histogram), value)


def _dt_mask_hook(batch: _Batch) -> TapHook:
    """Sets dt to -inf on padded positions, which freezes the SSM state after each document's end."""
    def hook(name: str, x: torch.Tensor) -> torch.Tensor | None:
        if batch.pad_mask is None:
            return None
        return x.masked_fill(batch.pad_mask[..., None], float("-inf"))
    return hook


@torch.no_grad()
def _check_observers(model: MambaLM, observers: dict[str, ObserverSpec]) -> None:
    """Fail before the run, not after it, when an observer cannot apply to its tap's channel shape
    (found with a one-token forward)."""
    shapes: dict[str, torch.Size] = {}

    def hook(name: str, x: torch.Tensor) -> None:
        observer = MinMaxObserver(channel_reduce_dims(model.config.arch, name))
        shapes[name] = observer.observe(_sample(x, 0, 1, name)).shape

    handles = [model.taps.add(name, hook) for name in observers]
    try:
        model.backbone(torch.zeros(1, 1, dtype=torch.long, device=model.device), None)
    finally:
        for h in handles:
            h.remove()
    for name, spec in observers.items():
        if spec.kind != "percentile":
            minmax_value(spec, name, torch.zeros(shapes[name]), model.config)


def _batches(data: CalibrationData, batch_size: int, device: torch.device
             ) -> Iterator[tuple[list[int], list[int], torch.Tensor, torch.Tensor | None]]:
    """(positions, lengths, ids, pad_mask or None) of consecutive documents, right-padded with id 0."""
    for start in range(0, data.n, batch_size):
        docs = data.token_ids[start:start + batch_size]
        lengths = [len(d) for d in docs]
        width = max(lengths)
        ids = torch.zeros(len(docs), width, dtype=torch.long)
        for row, doc in enumerate(docs):
            ids[row, :len(doc)] = torch.tensor(doc, dtype=torch.long)
        pad = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
        yield (list(range(start, start + len(docs))), lengths, ids.to(device),
               pad.to(device) if bool(pad.any()) else None)


@torch.no_grad()
def collect(model: MambaLM, data: CalibrationData, observers: dict[str, ObserverSpec],
            alphas: tuple[float, ...] = DEFAULT_ALPHAS, batch_size: int = 1, progress: bool = True
            ) -> dict[str, TapStats]:
    """Run `model` over `data` and return the statistics of every tap in `observers`."""
    cfg = model.config
    if batch_size < 1:
        raise SsmqError(f"batch size must be >= 1, got {batch_size}")
    if batch_size > 1 and cfg.arch == "mamba2" and cfg.dt_limit[0] > 0:
        raise SsmqError(f"batch size > 1 needs dt_limit starting at 0 to mask padding (model has {cfg.dt_limit}); "
                        "use --batch-size 1")
    top = max(max(ids) for ids in data.token_ids)
    if top >= cfg.vocab_size:
        raise SsmqError(f"{data.source}: token id {top} is outside the model's vocabulary ({cfg.vocab_size})")
    _check_observers(model, observers)
    batch = _Batch()
    recorders = {name: TapRecorder(name, cfg.arch, data, alphas, model.device, batch) for name in observers}
    handles = [model.taps.add(name, rec) for name, rec in recorders.items()]
    if batch_size > 1:
        handles.append(model.taps.add(_DT_TAP[cfg.arch], _dt_mask_hook(batch)))
    try:
        with tqdm(total=data.tokens, unit="tok", unit_scale=True, desc="calibrate", file=sys.stderr,
                  disable=not progress) as bar:
            for batch.positions, batch.lengths, ids, batch.pad_mask in _batches(data, batch_size, model.device):
                model.backbone(ids, None)
                bar.update(sum(batch.lengths))
    finally:
        for h in handles:
            h.remove()
    return {name: rec.finish(observers[name], cfg) for name, rec in recorders.items()}


def run_calibration(model: MambaLM, data: CalibrationData, rules: RuleSet | str | Sequence[str] | None = None,
                    batch_size: int = 1, progress: bool = True, model_name: str | None = None,
                    tokenizer: Tokenizer | None = None, extra_alphas: Sequence[float] = ()) -> CalibrationStats:
    """Calibrate a loaded model on prepared data; the statistics carry the provenance of the run.
    extra_alphas: more α for the grid of stored quantiles (to derive those percentiles later)."""
    ruleset = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    for alpha in extra_alphas:
        check_alpha_sigma(alpha, DEFAULT_SIGMA)
    arch = model.config.arch
    assignment = ruleset.assign(arch, scale_taps(model))
    observers = {name: spec for name, (spec, _) in assignment.items()}
    alphas = tuple(sorted(set(DEFAULT_ALPHAS) | set(extra_alphas)
                          | {s.param("alpha") for s in observers.values() if s.kind == "percentile"}))
    start = time.perf_counter()
    taps = collect(model, data, observers, alphas, batch_size, progress)
    seconds = time.perf_counter() - start
    log.info("calibrated %d documents, %d tokens in %.1f s (%.0f tokens/s)", data.n, data.tokens, seconds,
             data.tokens / seconds)
    provenance = {
        "ssmq_version": ssmq.__version__,
        "model": {"name": model_name or "<in memory>", "sha256": state_dict_sha256(model), "arch": arch},
        "tokenizer": {"sha256": tokenizer_sha256(tokenizer)} if tokenizer is not None else None,
        "data": data.provenance(),
        "rules": [str(r) for r in ruleset.rules(arch)],
        "batch_size": batch_size, "device": model.device.type, "dtype": str(model.dtype).removeprefix("torch."),
    }
    return CalibrationStats(model.config, alphas, DEFAULT_SIGMA, taps, provenance, seconds)


def check_output(output: str | Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output before any work is done (saving checks again)."""
    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise SsmqError(f"{target}: output exists and is not empty (pass --overwrite to replace it)")


def calibrate(model: str | Path | MambaLM, tokenizer: str | Path | Tokenizer | None = None,
              data: str | Path | CalibrationData | None = None, *, n: int | None = None, seqlen: int = 512,
              seed: int = 0, rules: str | Sequence[str] | None = None, batch_size: int = 1,
              device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
              output: str | Path | None = None, overwrite: bool = False, progress: bool = True,
              extra_alphas: Sequence[float] = ()) -> CalibrationStats:
    """Calibration statistics of `model` (a directory, a built-in name or a loaded MambaLM).

    tokenizer: a Tokenizer or its JSON file (default: the model directory's tokenizer.json).
    data: a JSONL or plain-text file, prepared CalibrationData, or None for documents 0-255 of the
    shared pile-val-512.jsonl; n documents (default: 512, or all if fewer), each truncated to seqlen
    tokens, chosen with `seed`. rules: rule strings or preset names (default: the architecture's
    preset). extra_alphas: more α for the stored quantile grid. With `output`, the statistics are also
    written there (atomically)."""
    if output is not None:
        check_output(output, overwrite)
    ruleset = RuleSet(rules)
    if isinstance(model, MambaLM):
        lm, name = model, None
        if device is not None or dtype is not None:
            lm = lm.to(device=parse_device(device), dtype=parse_dtype(dtype))
        tok = load_tokenizer(Path(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
        if tok is not None:
            check_vocab_fits(tok, lm.config.vocab_size, "tokenizer")
    else:
        name = str(model)
        lm, tok = load(model, tokenizer=tokenizer if not isinstance(tokenizer, Tokenizer) else None,
                       device=device if device is not None else "auto", dtype=dtype)
        if isinstance(tokenizer, Tokenizer):
            check_vocab_fits(tokenizer, lm.config.vocab_size, "tokenizer")
            tok = tokenizer
    if not isinstance(data, CalibrationData):
        if tok is None:
            raise SsmqError(f"{name or 'model'}: no tokenizer (the model has no tokenizer.json); pass one "
                            "with --tokenizer / tokenizer=")
        data = load_calibration_data(tok, data, n, seqlen, seed)
    stats = run_calibration(lm.eval(), data, ruleset, batch_size, progress, name, tok, extra_alphas)
    if output is not None:
        stats.save(output, overwrite)
    return stats
