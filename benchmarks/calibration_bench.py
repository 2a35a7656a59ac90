"""Calibration benchmark: throughput on a mamba-130m-shaped model, and the percentile observer's cost
and exactness against torch.quantile and numpy.

    python benchmarks/calibration_bench.py --device cpu --n 16           # CPU (a subset: the scan is a Python loop)
    python benchmarks/calibration_bench.py --device cuda --n 512 --json  # GPU, the full 512 x 512 tokens

Throughput: a random model with mamba-130m's shapes (d_model 768, 24 layers, vocab 50280) calibrated
with the quamba1 rules on n random documents of seqlen tokens; the same model's plain forward (no
observers) on the first --forward-docs documents is measured in the same run, so the observer
overhead is a ratio. The statistics are written once to report their size, and a second short
calibration checks that results are bit-identical.

Percentile: ssmq's exact quantile (numpy's definition) against torch.quantile on tensors up to 2^24
elements (torch.quantile's limit), timed both with the kthvalue floor (standalone observer) and with
the histogram floor (what calibration does, histogram included); exactness against numpy float64 on
every size, including one above 2^24 that torch.quantile refuses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ssmq
from ssmq.data import CalibrationData
from ssmq.models.device import parse_device, parse_dtype
from ssmq.quant.calibrate import run_calibration
from ssmq.quant.histogram import bin_counts, rank_floor
from ssmq.quant.observers import lowest_rank, quantiles
from ssmq.quant.stats import STATS_JSON, STATS_TENSORS

MAMBA_130M = dict(arch="mamba1", d_model=768, n_layer=24, vocab_size=50280)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stats_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (STATS_JSON, STATS_TENSORS):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def throughput(device: torch.device, dtype: torch.dtype, n: int, seqlen: int, batch_size: int,
               forward_docs: int) -> dict:
    model = ssmq.build_model(ssmq.MambaConfig(**MAMBA_130M), seed=0, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MAMBA_130M["vocab_size"], (n, seqlen), generator=gen)
    data = CalibrationData.from_token_ids(ids.tolist(), source=f"random ids {n}x{seqlen}")
    warm = CalibrationData.from_token_ids(ids[:batch_size].tolist())
    run_calibration(model, warm, batch_size=batch_size, progress=False)

    k = min(forward_docs, n)
    with torch.no_grad():
        def plain() -> None:
            for start in range(0, k, batch_size):
                model.backbone(ids[start:min(start + batch_size, k)].to(device), None)
        fwd_s = timed(plain, device, 1)

    stats = run_calibration(model, data, batch_size=batch_size, progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = stats.save(Path(tmp) / "stats")
        size = sum(f.stat().st_size for f in out.iterdir())
        first = stats_digest(out)
        probe = CalibrationData.from_token_ids(ids[:2].tolist())
        a = run_calibration(model, probe, batch_size=batch_size, progress=False).save(Path(tmp) / "a")
        b = run_calibration(model, probe, batch_size=batch_size, progress=False).save(Path(tmp) / "b")
        deterministic = stats_digest(a) == stats_digest(b)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "n": n, "seqlen": seqlen,
            "batch_size": batch_size, "tokens": data.tokens, "seconds": stats.seconds,
            "tokens_per_second": data.tokens / stats.seconds,
            "forward_only_docs": k, "forward_only_tokens_per_second": k * seqlen / fwd_s,
            "observer_overhead": (data.tokens / stats.seconds) ** -1 / (k * seqlen / fwd_s) ** -1,
            "taps": len(stats.taps), "stats_bytes": size, "stats_sha256": first,
            "bit_identical_rerun": deterministic}


def percentile_cost(device: torch.device, sizes: list[int], big: int, alpha: float, repeats: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for size in sizes + [big]:
        x = torch.randn(size, generator=gen).abs().to(device)
        exact = np.float32(np.quantile(x.cpu().numpy().astype(np.float64), alpha))
        ours = quantiles(x, [alpha])[0]

        def with_histogram() -> torch.Tensor:
            counts = bin_counts(x)
            return quantiles(x, [alpha], rank_floor(counts, lowest_rank(size, [alpha])))

        row = {"elements": size, "alpha": alpha,
               "ssmq_kthvalue_ms": timed(lambda: quantiles(x, [alpha]), device, repeats) * 1e3,
               "ssmq_histogram_ms": timed(with_histogram, device, repeats) * 1e3,
               "ssmq_equals_numpy": bool(float(ours) == float(exact)
                                         and float(with_histogram()) == float(exact))}
        try:
            ref = torch.quantile(x, alpha)
            row["torch_quantile_ms"] = timed(lambda: torch.quantile(x, alpha), device, repeats) * 1e3
            row["torch_quantile_rel_diff"] = abs(float(ref) - float(exact)) / float(exact)
        except RuntimeError as exc:
            row["torch_quantile_ms"] = None
            row["torch_quantile_error"] = str(exc).splitlines()[0]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="fp32", help="model dtype: fp32, fp16 or bf16")
    p.add_argument("--n", type=int, default=512, help="calibration documents")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per document")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--forward-docs", type=int, default=16, help="documents of the plain-forward baseline")
    p.add_argument("--alpha", type=float, default=0.9995)
    p.add_argument("--sizes", default=f"{2**16},{2**20},{2**24}", help="tensor sizes for torch.quantile comparison")
    p.add_argument("--big", type=int, default=2**25, help="a size above torch.quantile's 2^24 limit")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-percentile", action="store_true")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    info = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "ssmq": ssmq.__version__}
    result: dict = {"environment": info}
    if not args.skip_percentile:
        sizes = [int(s) for s in args.sizes.split(",")]
        result["percentile"] = percentile_cost(device, sizes, args.big, args.alpha, args.repeats)
    if not args.skip_throughput:
        result["throughput"] = throughput(device, dtype, args.n, args.seqlen, args.batch_size, args.forward_docs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# {info}")
    for row in result.get("percentile", []):
        torch_ms = f"{row['torch_quantile_ms']:.2f} ms" if row["torch_quantile_ms"] is not None else "refused"
        print(f"quantile  {row['elements']:>10d} el  torch.quantile {torch_ms:>11}  ssmq kthvalue "
              f"{row['ssmq_kthvalue_ms']:8.2f} ms  ssmq histogram {row['ssmq_histogram_ms']:8.2f} ms  "
              f"equals numpy: {row['ssmq_equals_numpy']}")
    t = result.get("throughput")
    if t:
        print(f"calibration  {t['n']} x {t['seqlen']} tokens, batch {t['batch_size']}, {t['device']} {t['dtype']}: "
              f"{t['tokens_per_second']:.0f} tokens/s ({t['seconds']:.1f} s); plain forward "
              f"{t['forward_only_tokens_per_second']:.0f} tokens/s; observer overhead x{t['observer_overhead']:.2f}; "
              f"stats {t['stats_bytes'] / 1e6:.1f} MB for {t['taps']} taps; bit-identical rerun: "
              f"{t['bit_identical_rerun']}")


if __name__ == "__main__":
    sys.exit(main())
