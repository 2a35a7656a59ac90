"""The benchmark: time to first token, time per output token, throughput and memory of a model, and the
side-by-side comparison of an fp16 model with its quantized twins (W8A8, W4A8, W4A16 ...; plus transformers'
fp16 path for Mamba1) in one run.

Prefill runs eagerly from an empty cache (TTFT = prefill + choosing the first token). Decoding replays
one captured CUDA graph per batch size (ssmq.bench.graphs); the eager decoding time is reported too.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ssmq.bench.graphs import GraphDecoder, static_cache
from ssmq.bench.memory import allocated_bytes, cache_bytes, peak_bytes, reset_peak, weight_bytes
from ssmq.bench.reference import transformers_available, transformers_model, transformers_tpot_ms
from ssmq.bench.timing import median_ms
from ssmq.models.lm import MambaLM

EAGER_STEPS = 8
RESERVED = ("batch", "fp16", "ratios", "transformers_fp16")  # row keys that are not model labels

log = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    prompt_len: int = 1024
    gen_len: int = 128
    batches: tuple[int, ...] = (1, 16)
    repeats: int = 3
    seed: int = 0
    transformers: bool = True
    int8_head: bool = False  # quantized embedding and lm_head: recorded here; the models given must be built so


@dataclass
class Timing:
    """One model at one batch size. Times in ms; tokens_per_s is the decoding throughput (all sequences).
    peak_bytes is this model's own peak: its weights plus the most memory its prefill and decoding held
    above what was allocated before (other models resident in the process are not counted)."""

    model: str
    batch: int
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float
    tpot_eager_ms: float
    cuda_graphs: bool
    weight_bytes: int
    cache_bytes: int
    peak_bytes: int | None


@torch.no_grad()
def time_model(model: MambaLM, label: str, batch: int, s: BenchSettings) -> Timing:
    """Time prefill and decoding of `model` for `batch` random prompts of s.prompt_len tokens."""
    device = model.device
    gen = torch.Generator(device).manual_seed(s.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, s.prompt_len), device=device, generator=gen)
    graphs = device.type == "cuda"

    def prefill() -> tuple[Any, torch.Tensor]:
        cache = static_cache(model.config.n_layer) if graphs else model.new_cache()
        return cache, model(ids, cache)[:, -1].argmax(-1)

    reset_peak(device)
    resting = allocated_bytes(device)
    ttft = median_ms(prefill, device, s.repeats)
    cache, first = prefill()
    if graphs:
        decoder = GraphDecoder(model, cache, first)
        tpot = median_ms(lambda: [decoder.step() for _ in range(s.gen_len)], device, s.repeats) / s.gen_len
    tok = first.reshape(-1, 1)

    def eager_steps() -> None:
        nonlocal tok
        for _ in range(EAGER_STEPS):
            tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)

    eager = median_ms(eager_steps, device, 1) / EAGER_STEPS
    if not graphs:
        tpot = eager
    weights = weight_bytes(model)
    peak = peak_bytes(device)
    own_peak = None if peak is None else weights + peak - resting
    return Timing(label, batch, ttft, tpot, batch * 1e3 / tpot, eager, graphs, weights, cache_bytes(cache), own_peak)


@dataclass
class Comparison:
    """fp16 and quantized timings per batch size, their ratios, and transformers' fp16 decoding time.
    `labels` names the quantized models in the order they were timed."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def environment(device: torch.device) -> dict[str, Any]:
    """Where and when the benchmark ran."""
    env: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def ratios(fp: Timing, q: Timing) -> dict[str, float | None]:
    """Speed-ups (fp16 time / quantized time) and memory fractions (quantized bytes / fp16 bytes)."""
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {"ttft_speedup": div(fp.ttft_ms, q.ttft_ms), "tpot_speedup": div(fp.tpot_ms, q.tpot_ms),
            "weight_fraction": div(q.weight_bytes, fp.weight_bytes),
            "cache_fraction": div(q.cache_bytes, fp.cache_bytes), "peak_fraction": div(q.peak_bytes, fp.peak_bytes)}


def compare_models(fp_model: MambaLM, models: Mapping[str, MambaLM], s: BenchSettings) -> Comparison:
    """Benchmark the fp16 model and each quantized model (label -> model) at every batch size of `s`, then
    transformers' fp16 decoding on the same shape (Mamba1, when installed and s.transformers).

    One row per batch size: {"batch", "fp16": Timing, LABEL: Timing for each label, "ratios": {LABEL:
    ratios(fp16, LABEL)}}, and "transformers_fp16": {"tpot_ms", "steps", "fp16_vs_transformers_tpot"
    (its time / our fp16 time)} when it ran."""
    if not models:
        raise ValueError("compare_models needs at least one quantized model")
    clash = [label for label in models if label in RESERVED]
    if clash:
        raise ValueError(f"model label {clash[0]!r} is reserved (row keys: {', '.join(RESERVED)})")
    device = fp_model.device
    result = Comparison(settings=asdict(s), environment=environment(device), labels=list(models))
    for batch in s.batches:
        fp = time_model(fp_model, "fp16", batch, s)
        row: dict[str, Any] = {"batch": batch, "fp16": asdict(fp), "ratios": {}}
        for label, model in models.items():
            q = time_model(model, label, batch, s)
            row[label] = asdict(q)
            row["ratios"][label] = ratios(fp, q)
        result.rows.append(row)
    if s.transformers and fp_model.config.arch != "mamba1":
        log.info("transformers' reference is timed for Mamba1 shapes only; skipped for %s", fp_model.config.arch)
    elif s.transformers and transformers_available():
        hf = transformers_model(fp_model.config, device, s.seed)
        steps = min(s.gen_len, 16)
        for row in result.rows:
            tpot = transformers_tpot_ms(hf, row["batch"], steps, s.repeats)
            row["transformers_fp16"] = {"tpot_ms": tpot, "steps": steps,
                                        "fp16_vs_transformers_tpot": tpot / row["fp16"]["tpot_ms"]}
        del hf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result

