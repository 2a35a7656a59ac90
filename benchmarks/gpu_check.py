"""GPU check of the Triton kernels and the fp16 / W8A8 benchmark, in one run on a CUDA machine.

Stages (all by default, in this order; --stages picks some):
  checks  every kernel, through ssmq.ops.dispatch, against its reference op on mamba-2.8b-sized
          shapes (prefill and decode): codes identical on >= 99.99% and never > 1 step apart,
          floats within 1e-3 relative error (ssmq.ops.triton.conformance)
  model   whole models (mamba-130m shape): logits with kernels vs with reference ops, and CUDA-graph
          decoding vs eager decoding (must be bit-identical); quamba1 twins with fp16 and int8 heads
  m2model the same on the mamba2-130m shape for quamba2-w8a8, -w4a8 and -w4a16 twins
  scan    the chunked prefill scan in a few tile configurations; the fastest is used afterwards
  tune    the batch-1 GEMV of each --shape weight in a few configurations (dp4a kernel included); the
          fastest bit-exact one is used by the later stages of this run
  bench   `ssmq bench --int8-head`'s comparison on --shape: fp16 vs W8A8 with the embedding and lm_head
          as one shared int8 table (+ transformers fp16)
  bench_fp16_head  the same at batch 1 with the quamba1 plan's fp16 embedding and lm_head
  profile GPU time by kernel of one prefill, one eager decoding step and one decoding step replayed
          from a CUDA graph, for fp16 and the --profile-recipe twin
  linear  W8A8 linear kernels vs cuBLAS fp16 on the --shape projections (GB/s, TOPS); with
          --sweep-linear also alternative tile shapes
  m2checks, m2time  Mamba2 SSD-scan and W4A16 / W4A8 kernels at mamba2-2.7b shapes: checks, then times
          beside fp16 and W8A8 (benchmarks/mamba2_gpu.py; both within --m2-budget-s)
  ab      (not run by default) decoding time per token of fp16 and the --profile-recipe twin with a
          module-level kernel switch set to each of a few values in turn (--ab-switch; by default
          programmatic dependent launch on, off and on again)
Each stage runs alone (an exception fails that stage only) and starts only if its expected cost
(STAGE_COST_S) fits in --budget-s. Prints a pass/fail table and a ratio table last, then one line
`SUMMARY_JSON {...}` with the headline numbers; writes $OUT/gpu_check.json (or ./gpu_check.json).

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--stages checks,model,tune,bench,...]
        [--shape mamba-2.8b] [--prompt-len 2048] [--gen-len 128] [--batch 1,16] [--budget-s 240]
    PYTHONPATH=. python3 benchmarks/gpu_check.py --dry-run     # CPU, Triton interpreter, tiny shapes: tests this script
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    from ssmq.ops.triton.interpreter import use_interpreter

    use_interpreter()

import torch  # noqa: E402

from ssmq.ops import conv, dispatch, hadamard, int8_conv, int8_linear, int8_norm, int8_scan, norm, scan  # noqa: E402
from ssmq.ops.quantize import quantize  # noqa: E402
from ssmq.ops.triton.conformance import agreement  # noqa: E402

import mamba2_gpu  # noqa: E402  (benchmarks/mamba2_gpu.py: the m2checks and m2time stages)

OUT = Path(os.environ.get("OUT", "."))
RESULTS: dict = {"argv": sys.argv[1:], "stages": {}}
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def save() -> None:
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


# ---------------------------------------------------------------- reference ops on demand

@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Inside the block every ssmq.ops.dispatch function takes its reference op, even on CUDA tensors."""
    saved = dispatch.uses_kernels
    dispatch.uses_kernels = lambda *tensors: False
    try:
        yield
    finally:
        dispatch.uses_kernels = saved


# ---------------------------------------------------------------- stage: kernel checks

class Checks:
    """Kernel-vs-reference cases; each row: name, shape, agreements, pass."""

    def __init__(self, device: torch.device, dims: dict[str, int]):
        self.dev, self.d = device, dims
        self.gen = torch.Generator(device).manual_seed(0)
        self.rows: list[dict] = []

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, device=self.dev, generator=self.gen) * scale).to(dtype)

    def codes(self, *shape: int) -> torch.Tensor:
        return torch.randint(-128, 128, shape, device=self.dev, generator=self.gen, dtype=torch.int8)

    def scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, device=self.dev)

    def poison(self) -> None:
        """Fill freed allocator blocks with 0x7F bytes, so unwritten outputs show up as wrong values."""
        if self.dev.type == "cuda":
            torch.full((256 * 2 ** 20,), 0x7F, dtype=torch.uint8, device=self.dev)  # freed at once

    def case(self, name: str, shape: str, kernel: Callable[[], object], reference: Callable[[], object]) -> None:
        try:
            self.poison()
            outs = kernel()
            refs = reference()
            outs = outs if isinstance(outs, tuple) else (outs,)
            refs = refs if isinstance(refs, tuple) else (refs,)
            agreements = [agreement(o, r) for o, r in zip(outs, refs)]
            ok = all(a.ok for a in agreements)
            row = {"name": name, "shape": shape, "ok": ok, "result": "; ".join(str(a) for a in agreements),
                   "agreements": [asdict(a) for a in agreements]}
        except Exception as exc:  # a crash is a failed check, reported with the others
            traceback.print_exc()
            row = {"name": name, "shape": shape, "ok": False, "result": f"error: {type(exc).__name__}: {exc}"[:200]}
        self.rows.append(row)
        log(f"{'PASS' if row['ok'] else 'FAIL'} {name} {shape}: {row['result']}")

    def run(self) -> list[dict]:
        d = self.d
        dm, di, r, n, L, B = d["d_model"], d["d_inner"], d["dt_rank"], d["d_state"], d["L"], d["B"]
        s = self.scalar
        # quantize: ties (scale 2^-6 makes (k + 0.5) * s exact), saturation, inf, nan
        x = self.randn(L, di, dtype=torch.float16, scale=2.0)
        x[0, :8] = torch.tensor([0.5, 1.5, 2.5, -2.5, float("inf"), float("-inf"), float("nan"), 300.0]) / 64
        x[0, 4:7] *= 64
        self.case("quantize fp16 per-tensor, ties/inf/nan", f"({L},{di})",
                  lambda: dispatch.quantize(x, s(1 / 64)), lambda: quantize(x, s(1 / 64)))
        rows_scale = self.randn(L, 1).abs() * 0.02 + 1e-3
        xf = self.randn(L, di)
        self.case("quantize fp32 per-row", f"({L},{di})", lambda: dispatch.quantize(xf, rows_scale),
                  lambda: quantize(xf, rows_scale))
        ch_scale = self.randn(di).abs() * 0.02 + 1e-3
        self.case("quantize fp32 per-channel", f"({L},{di})", lambda: dispatch.quantize(xf, ch_scale),
                  lambda: quantize(xf, ch_scale))
        # W8A8 linears of a block: in_proj, x_proj, dt_proj (strided input), out_proj; out_proj as a model calls
        # it (its weights loaded before the PDL wait), the others as direct calls
        for label, nout, k in (("in_proj", 2 * di, dm), ("x_proj", r + 2 * n, di), ("out_proj", dm, di)):
            w = self.codes(nout, k)
            for m in (1, 16, L):
                xq = self.codes(m, k)
                if label == "out_proj":
                    self.case(f"int8_linear {label} -> fp32", f"M={m} N={nout} K={k}",
                              lambda: dispatch.int8_linear(xq, s(0.01), w, s(0.002), out_dtype=torch.float32,
                                                           constant_weights=True),
                              lambda: int8_linear.int8_linear(xq, s(0.01), w, s(0.002), out_dtype=torch.float32))
                else:
                    self.case(f"int8_linear {label} -> int8", f"M={m} N={nout} K={k}",
                              lambda: dispatch.int8_linear(xq, s(0.01), w, s(0.002), out_scale=s(0.05)),
                              lambda: int8_linear.int8_linear(xq, s(0.01), w, s(0.002), out_scale=s(0.05)))
        wdt = self.codes(di, r)
        for m in (1, L):
            xdbl = self.codes(m, r + 2 * n)
            self.case("int8_linear dt_proj (strided x) -> int8", f"M={m} N={di} K={r}",
                      lambda: dispatch.int8_linear(xdbl[:, :r], s(0.02), wdt, s(0.01), out_scale=s(0.03)),
                      lambda: int8_linear.int8_linear(xdbl[:, :r], s(0.02), wdt, s(0.01), out_scale=s(0.03)))
        wch, bias = self.codes(dm, di), self.randn(dm)
        tok_scale, w_scale = self.randn(16, 1).abs() * 0.01 + 1e-3, self.randn(dm).abs() * 0.002 + 1e-4
        x16 = self.codes(16, di)
        self.case("int8_linear per-token x, per-channel w, bias -> fp16", f"M=16 N={dm} K={di}",
                  lambda: dispatch.int8_linear(x16, tok_scale, wch, w_scale, bias),
                  lambda: int8_linear.int8_linear(x16, tok_scale, wch, w_scale, bias))
        # conv1d + SiLU + quantize: prefill on the strided x half of in_proj's output, and decode steps
        xz = self.codes(1, L, 2 * di)
        wc, bc, st = self.codes(di, 4), self.randn(di), self.codes(1, 3, di)
        self.case("int8 conv1d+silu+quantize prefill", f"(1,{L},{di}) k=4, state",
                  lambda: dispatch.int8_causal_conv1d_silu(xz[..., :di], s(0.02), wc, s(0.01), bc, s(0.01), st),
                  lambda: int8_conv.int8_causal_conv1d_silu(xz[..., :di], s(0.02), wc, s(0.01), bc, s(0.01), st))
        xz1, st16 = self.codes(16, 1, 2 * di), self.codes(16, 3, di)
        self.case("int8 conv1d+silu+quantize step", f"(16,1,{di})",
                  lambda: dispatch.int8_causal_conv1d_silu(xz1[..., :di], s(0.02), wc, s(0.01), bc, s(0.01), st16),
                  lambda: int8_conv.int8_causal_conv1d_silu(xz1[..., :di], s(0.02), wc, s(0.01), bc, s(0.01), st16))
        slot = dispatch.mark_static_state(st16.clone())
        self.case("int8 conv1d step, state in place", f"(16,1,{di})",
                  lambda: (dispatch.int8_causal_conv1d(xz1[..., :di], s(0.02), wc, s(0.01), bc, slot)[0], slot),
                  lambda: int8_conv.int8_causal_conv1d(xz1[..., :di], s(0.02), wc, s(0.01), bc, st16))
        xh, wh, sh = self.randn(1, L, 2 * di, dtype=torch.float16), self.randn(di, 4, dtype=torch.float16, scale=0.5), \
            self.randn(1, 3, di, dtype=torch.float16)
        self.case("fp16 conv1d prefill", f"(1,{L},{di})", lambda: dispatch.causal_conv1d(xh[..., :di], wh, bc, sh),
                  lambda: conv.causal_conv1d(xh[..., :di], wh, bc, sh))
        self.case("fp16 conv1d+silu prefill", f"(1,{L},{di})",
                  lambda: dispatch.causal_conv1d_silu(xh[..., :di], wh, bc, sh)[0],
                  lambda: torch.nn.functional.silu(conv.causal_conv1d(xh[..., :di], wh, bc, sh)[0]).half())
        xh1, sh16 = self.randn(16, 1, di, dtype=torch.float16), self.randn(16, 3, di, dtype=torch.float16)
        self.case("fp16 conv1d step", f"(16,1,{di})", lambda: dispatch.causal_conv1d(xh1, wh, bc, sh16),
                  lambda: conv.causal_conv1d(xh1, wh, bc, sh16))
        # residual add + RMSNorm + quantize
        hid, res, nw = self.randn(L, dm, dtype=torch.float16), self.randn(L, dm, scale=4.0), \
            (self.randn(dm).abs() + 0.5).half()
        self.case("int8 add+rmsnorm+quantize (fp32 residual)", f"({L},{dm})",
                  lambda: dispatch.int8_add_rms_norm(hid, res, nw, 1e-5, s(0.03)),
                  lambda: int8_norm.int8_add_rms_norm(hid, res, nw, 1e-5, s(0.03)))
        self.case("int8 rmsnorm+quantize (first block, fp16 residual)", f"({L},{dm})",
                  lambda: dispatch.int8_add_rms_norm(hid, None, nw, 1e-5, s(0.03), False),
                  lambda: int8_norm.int8_add_rms_norm(hid, None, nw, 1e-5, s(0.03), False))
        self.case("fp16 rmsnorm (fp32 in)", f"({L},{dm})", lambda: dispatch.rms_norm(res, nw, 1e-5),
                  lambda: norm.rms_norm(res, nw, 1e-5))
        self.case("fp16 add+rmsnorm", f"({L},{dm})", lambda: dispatch.add_rms_norm(hid, res, nw, 1e-5),
                  lambda: (norm.rms_norm(res + hid.float(), nw, 1e-5), res + hid.float()))
        # Hadamard rotation (+ quantize) before out_proj; 16 decoding rows (split over programs as one row
        # is), so that one code rounded the other way at a .5 tie is not alone 0.012% of the sample
        for rows in (16, L):
            y = self.randn(rows, di, dtype=torch.float16)
            self.case("hadamard fp16 -> fp32", f"({rows},{di})", lambda: dispatch.hadamard_transform(y),
                      lambda: hadamard.hadamard_transform(y))
            self.case("hadamard + quantize", f"({rows},{di})", lambda: dispatch.hadamard_quantize(y, s(0.02)),
                      lambda: quantize(hadamard.hadamard_transform(y.float()), s(0.02)))
        yf = self.randn(16, di)
        self.case("hadamard fp32 -> fp32", f"(16,{di})", lambda: dispatch.hadamard_transform(yf),
                  lambda: hadamard.hadamard_transform(yf))
        # selective scan: int8 (prefill, with initial state, steps in place) and fp16
        A = -torch.exp(self.randn(di, n).abs().log1p())
        Dp, db = self.randn(di), self.randn(di, scale=0.5) - 4.0
        for b, length, with_state in ((1, L, False), (B, 300, True)):
            u, dl, z = self.codes(b, length, di), self.codes(b, length, di), self.codes(b, length, di)
            xdbl = self.codes(b, length, r + 2 * n)
            Bq, Cq = xdbl[..., r:r + n], xdbl[..., r + n:]
            hq = self.codes(b, di, n) if with_state else None
            kw = dict(D=Dp, z_q=z, z_scale=s(0.05), delta_bias=db, state_q=hq)
            args = (u, s(0.01), dl, s(0.02), A, Bq, s(0.03), Cq, s(0.03), s(0.05))
            self.case("int8 selective scan prefill", f"({b},{length},{di}) n={n}" + (" state" if with_state else ""),
                      lambda: dispatch.int8_selective_scan(*args, **kw),
                      lambda: int8_scan.int8_selective_scan(*args, **kw))
        u, dl, z, xdbl = self.codes(B, 1, di), self.codes(B, 1, di), self.codes(B, 1, di), self.codes(B, 1, r + 2 * n)
        hq = self.codes(B, di, n)
        args = (u, s(0.01), dl, s(0.02), A, xdbl[..., r:r + n], s(0.03), xdbl[..., r + n:], s(0.03), s(0.05))
        kw = dict(D=Dp, z_q=z, z_scale=s(0.05), delta_bias=db)
        slot = dispatch.mark_static_state(hq.clone())
        self.case("int8 selective scan step, state in place", f"({B},1,{di}) n={n}",
                  lambda: (dispatch.int8_selective_scan(*args, **kw, state_q=slot)[0], slot),
                  lambda: int8_scan.int8_selective_scan(*args, **kw, state_q=hq))
        uf, df, zf = (self.randn(1, L, di, dtype=torch.float16) for _ in range(3))
        Bf, Cf = self.randn(1, L, n, dtype=torch.float16), self.randn(1, L, n, dtype=torch.float16)
        self.case("fp16 selective scan prefill", f"(1,{L},{di}) n={n}",
                  lambda: dispatch.selective_scan(uf, df, A, Bf, Cf, Dp, zf, db),
                  lambda: scan.selective_scan(uf, df, A, Bf, Cf, Dp, zf, db))
        h0 = self.randn(B, di, n)
        uf1, df1, zf1 = (self.randn(B, 1, di, dtype=torch.float16) for _ in range(3))
        Bf1, Cf1 = self.randn(B, 1, n, dtype=torch.float16), self.randn(B, 1, n, dtype=torch.float16)
        self.case("fp16 selective scan step", f"({B},1,{di}) n={n}",
                  lambda: dispatch.selective_scan(uf1, df1, A, Bf1, Cf1, Dp, zf1, db, True, h0),
                  lambda: scan.selective_scan(uf1, df1, A, Bf1, Cf1, Dp, zf1, db, True, h0))
        return self.rows


# ---------------------------------------------------------------- stage: whole models

def model_checks(device: torch.device, shape_cfg, recipes: tuple[str, ...] = ("quamba1",)) -> dict:
    """Per recipe (quantized body, then also a quantized embedding and lm_head) and for fp16: the kernels'
    logits over a prefill and 4 decoding steps against the reference ops (and the reference ops on the GPU
    against the CPU, the float noise floor), and CUDA-graph decoding against eager decoding."""
    from ssmq.bench.graphs import GraphDecoder, static_cache
    from ssmq.bench.models import prepare_for_inference, random_fp_model, random_quantized_model

    out: dict = {}
    gen = torch.Generator(device).manual_seed(1)
    ids = torch.randint(0, shape_cfg.vocab_size, (2, 64), device=device, generator=gen)
    steps = 4
    builds = [(f"{r}{' quantized head' if head else ''}",
               lambda r=r, head=head: random_quantized_model(shape_cfg, device, r, seed=1, quantize_embedding=head,
                                                             quantize_lm_head=head))
              for r in recipes for head in (False, True)]
    builds.append(("fp16", lambda: random_fp_model(shape_cfg, device, seed=1)))
    for label, build in builds:
        model = prepare_for_inference(build())

        def run() -> torch.Tensor:
            cache = model.new_cache()
            logits = [model(ids, cache)[:, -1:]]
            for _ in range(steps):
                logits.append(model(logits[-1].argmax(-1), cache))
            return torch.cat(logits, 1).float()

        def graph_equals_eager() -> bool:
            cache = static_cache(shape_cfg.n_layer)
            first = model(ids, cache)[:, -1].argmax(-1)
            eager_cache = static_cache(shape_cfg.n_layer)
            model(ids, eager_cache)
            decoder = GraphDecoder(model, cache, first)
            graph_logits, eager_logits, tok = [], [], first.reshape(-1, 1)
            for _ in range(steps):
                graph_logits.append(decoder.step().clone())
                eager_logits.append(model(tok, eager_cache))
                tok = eager_logits[-1][:, -1].argmax(-1, keepdim=True)
            return all(torch.equal(g, e) for g, e in zip(graph_logits, eager_logits))

        with torch.no_grad():
            with reference_ops():
                ref = run()
                if device.type == "cuda":  # the same reference ops on the CPU: the float noise floor
                    gpu_model, gpu_ids = model, ids
                    model, ids = copy.deepcopy(model).to("cpu"), ids.cpu()
                    cpu_ref = run().to(device)
                    model, ids = gpu_model, gpu_ids
                    a = agreement(ref, cpu_ref)
                    agree = float((ref.argmax(-1) == cpu_ref.argmax(-1)).float().mean())
                    out[f"{label} logits, reference ops on GPU vs on CPU"] = {"rel_error": a.rel_error,
                                                                              "argmax_agree": agree}
                    log(f"{label} reference GPU vs CPU: logits rel error {a.rel_error:.2e}, "
                        f"argmax agreement {agree:.3f}")
            fast = run()
            a = agreement(fast, ref)
            agree = float((fast.argmax(-1) == ref.argmax(-1)).float().mean())
            out[f"{label} logits, kernels vs reference ops"] = {"rel_error": a.rel_error, "argmax_agree": agree}
            log(f"{label} kernels: logits rel error {a.rel_error:.2e}, argmax agreement {agree:.3f}")
            if device.type == "cuda":
                same = graph_equals_eager()
                out[f"{label} CUDA-graph decode == eager decode"] = same
                log(f"{label}: CUDA-graph decoding identical to eager: {same}")
    return out


# ---------------------------------------------------------------- stage: micro benchmarks

GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn, bk, w in (
    (1, 1024, 4), (4, 1024, 4), (8, 1024, 4), (8, 512, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (16, 256, 4))]
GEMM16_CONFIGS = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=st)
                  for bn, bk, w, st in ((64, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 5), (128, 128, 4, 4),
                                        (32, 512, 4, 3))]
GEMM_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                          (128, 128, 64, 4, 4), (64, 256, 128, 8, 4))]


def linear_micro(device: torch.device, dims: dict[str, int], sweep: bool) -> dict:
    """W8A8 linear (default tiles, then a few alternatives) vs cuBLAS fp16 on the block's projections."""
    from triton.testing import do_bench

    from ssmq.ops.triton import linear as tlinear

    out: dict = {"linear": []}
    dm, di, r, n = dims["d_model"], dims["d_inner"], dims["dt_rank"], dims["d_state"]
    s = torch.tensor(0.01, device=device)
    copies = 6  # weights cycled so that repeated calls stream them from HBM, not from the 50 MB L2
    for label, nout, k in (("in_proj", 2 * di, dm), ("x_proj", r + 2 * n, di), ("dt_proj", di, r),
                           ("out_proj", dm, di)):
        w8 = [torch.randint(-127, 128, (nout, k), device=device, dtype=torch.int8) for _ in range(copies)]
        w16 = [torch.randn(nout, k, device=device, dtype=torch.float16) for _ in range(copies)]
        for m in (1, 16, 2048):
            x8 = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
            x16 = torch.randn(m, k, device=device, dtype=torch.float16)
            it = iter(range(10 ** 9))

            def w8a8(cfg=None):
                return tlinear.int8_linear(x8, s, w8[next(it) % copies], s, out_scale=s, config=cfg)

            t8 = do_bench(w8a8, return_mode="median")
            t16 = do_bench(lambda: torch.nn.functional.linear(x16, w16[next(it) % copies]), return_mode="median")
            row = {"op": label, "M": m, "N": nout, "K": k, "w8a8_us": t8 * 1e3, "fp16_cublas_us": t16 * 1e3,
                   "w8a8_GBps": nout * k / t8 / 1e6, "fp16_GBps": 2 * nout * k / t16 / 1e6,
                   "w8a8_TOPS": 2 * m * nout * k / t8 / 1e9, "fp16_TFLOPS": 2 * m * nout * k / t16 / 1e9,
                   "alternatives": []}
            if sweep and (label in ("in_proj", "out_proj", "x_proj") or m == 1):
                for cfg in GEMV_CONFIGS if m == 1 else GEMM16_CONFIGS if m == 16 else GEMM_CONFIGS:
                    try:
                        t = do_bench(lambda: w8a8(cfg), return_mode="median", warmup=10, rep=30)
                        row["alternatives"].append({**cfg, "us": t * 1e3})
                    except Exception as exc:
                        row["alternatives"].append({**cfg, "error": str(exc)[:200]})
            best = min((a for a in row["alternatives"] if "us" in a), key=lambda a: a["us"], default=None)
            out["linear"].append(row)
            log(f"{label} M={m}: w8a8 {row['w8a8_us']:.1f} us ({row['w8a8_GBps']:.0f} GB/s, {row['w8a8_TOPS']:.0f} "
                f"TOPS), fp16 cuBLAS {row['fp16_cublas_us']:.1f} us ({row['fp16_GBps']:.0f} GB/s, "
                f"{row['fp16_TFLOPS']:.0f} TFLOPS); best alternative {best}")
    return out


TUNE_GEMV = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, DP4A=d) for d, bn, bk, w in (
    (0, 16, 256, 4), (1, 8, 512, 4), (1, 4, 1024, 4), (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 512, 8),
    (1, 2, 2048, 4))]
"""Each configuration compiles once per output kind (about 1 s each without a carried Triton cache)."""


def tune_gemv(device: torch.device, dims: dict[str, int], vocab: int) -> dict:
    """For each weight of a decoding step at batch 1 (M=1 GEMVs), time the default configuration and a few
    others (the dp4a kernel among them), keep those whose output is bit-identical to the reference op,
    and install the fastest in ssmq.ops.triton.linear.GEMV_TUNED for the rest of this run (bench and
    profile stages). Weights are cycled through copies, so that they stream from HBM as in a model."""
    from triton.testing import do_bench

    from ssmq.ops.triton import linear as tlinear

    out: dict = {"gemv": []}
    dm, di, r, n = dims["d_model"], dims["d_inner"], dims["dt_rank"], dims["d_state"]
    s = torch.tensor(0.01, device=device)
    g = torch.Generator(device).manual_seed(3)
    for label, nout, k, int8_out in (("in_proj", 2 * di, dm, True), ("x_proj", r + 2 * n, di, True),
                                     ("dt_proj", di, r, True), ("out_proj", dm, di, False),
                                     ("lm_head", vocab, dm, False)):
        copies = max(2, min(8, (160 << 20) // (nout * k)))
        ws = [torch.randint(-127, 128, (nout, k), device=device, dtype=torch.int8, generator=g) for _ in range(copies)]
        wide = torch.randint(-127, 128, (1, k + 2 * n if label == "dt_proj" else k), device=device,
                             dtype=torch.int8, generator=g)
        x = wide[:, :k]  # dt_proj reads the dt part of x_proj's output: a strided view, as in the model
        kw = dict(out_scale=s) if int8_out else dict(out_dtype=torch.float16)
        ref = int8_linear.int8_linear(x, s, ws[0], s, **kw)
        it = iter(range(10 ** 9))
        row: dict = {"op": label, "N": nout, "K": k, "configs": []}
        for cfg in [None] + TUNE_GEMV:
            try:
                got = tlinear.int8_linear(x, s, ws[0], s, config=cfg, **kw)
                exact = bool(torch.equal(got, ref))
                t = do_bench(lambda: tlinear.int8_linear(x, s, ws[next(it) % copies], s, config=cfg, **kw),
                             warmup=5, rep=25, return_mode="median")
                row["configs"].append({"config": cfg or "default", "us": t * 1e3, "exact": exact,
                                       "GBps": nout * k / t / 1e6})
            except Exception as exc:
                row["configs"].append({"config": cfg or "default", "error": f"{type(exc).__name__}: {exc}"[:160]})
        timed = [c for c in row["configs"] if c.get("exact")]
        best = min(timed, key=lambda c: c["us"], default=None)
        default = next((c for c in row["configs"] if c["config"] == "default" and "us" in c), None)
        if best is not None and best["config"] != "default":
            tlinear.GEMV_TUNED[(nout, k)] = dict(best["config"])
        row["chosen"] = best
        out["gemv"].append(row)
        log(f"GEMV {label} N={nout} K={k}: default {default and round(default['us'], 1)} us, best "
            f"{best and round(best['us'], 1)} us {best and best['config']} ({best and round(best['GBps'])} GB/s)"
            + ("; NOT EXACT: " + str([c['config'] for c in row['configs'] if c.get('exact') is False])
               if any(c.get("exact") is False for c in row["configs"]) else ""))
    out["installed"] = {f"{k[0]}x{k[1]}": v for k, v in tlinear.GEMV_TUNED.items()}
    return out


SCAN_CONFIGS = [dict(BLOCK_D=bd, T=t, num_warps=w) for bd, t, w in (
    (8, 16, 2), (16, 16, 4), (8, 32, 4), (4, 16, 1), (4, 32, 2), (8, 8, 2), (8, 16, 1), (16, 8, 2))]


def scan_sweep(device: torch.device, dims: dict[str, int]) -> dict:
    """Time the chunked prefill scan in a few tile configurations; the fastest is used from then on."""
    from triton.testing import do_bench

    from ssmq.ops.triton import scan as tscan

    out: dict = {"scan_configs": []}
    di, n, L = dims["d_inner"], dims["d_state"], 2048
    g = torch.Generator(device).manual_seed(2)
    u, dl, z = (torch.randn(1, L, di, device=device, generator=g).half() for _ in range(3))
    Bm, Cm = (torch.randn(1, L, n, device=device, generator=g).half() for _ in range(2))
    A = -torch.rand(di, n, device=device, generator=g) - 0.5
    Dp, db = torch.ones(di, device=device), torch.zeros(di, device=device)
    best = None
    for cfg in SCAN_CONFIGS:
        try:
            t = do_bench(lambda: tscan.selective_scan(u, dl, A, Bm, Cm, Dp, z, db, True, None, torch.float16,
                                                      config=cfg), return_mode="median")
        except Exception as exc:
            log(f"scan config {cfg} failed: {exc}")
            continue
        out["scan_configs"].append({**cfg, "L": L, "d_inner": di, "us": t * 1e3})
        log(f"scan prefill (1,{L},{di}) {cfg}: {t * 1e3:.0f} us")
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is not None:
        tscan.PREFILL_CONFIG.update(best[1])
        out["scan_config_used"] = best[1]
        q = [torch.randint(-127, 128, t.shape, device=device, dtype=torch.int8) for t in (u, Bm)]
        sc = {k: torch.tensor(0.02, device=device) for k in ("u", "delta", "B", "C", "z", "state")}
        t = do_bench(lambda: tscan.selective_scan(q[0], q[0], A, q[1], q[1], Dp, q[0], db, True, None, torch.float16,
                                                  scales=sc), return_mode="median")
        out["int8_scan_us"] = t * 1e3
        log(f"int8 scan prefill with the chosen config: {t * 1e3:.0f} us")
    return out


# ---------------------------------------------------------------- stage: benchmark

def bench(device: torch.device, args: argparse.Namespace, int8_head: bool = True, batches: str | None = None,
          transformers: bool = True) -> dict:
    """`ssmq bench --shape S [--int8-head]`'s comparison (ssmq.bench.run.compare_models) of fp16 and a quamba1
    twin labelled "w8a8", on random weights."""
    from ssmq.bench.models import prepare_for_inference, random_fp_model, random_quantized_model
    from ssmq.bench.run import BenchSettings, compare_models
    from ssmq.bench.shapes import shape_config

    cfg = shape_config(args.shape)
    settings = BenchSettings(prompt_len=args.prompt_len, gen_len=args.gen_len,
                             batches=tuple(int(b) for b in (batches or args.batch).split(",")), repeats=args.repeats,
                             transformers=transformers and not args.no_transformers, int8_head=int8_head)
    fp = prepare_for_inference(random_fp_model(cfg, device))
    q = prepare_for_inference(random_quantized_model(cfg, device, quantize_embedding=int8_head,
                                                        quantize_lm_head=int8_head))
    result = compare_models(fp, {"w8a8": q}, settings)
    return {"settings": result.settings, "environment": result.environment, "rows": result.rows}


def profile(device: torch.device, args: argparse.Namespace) -> dict:
    """GPU kernel time by kernel of one prefill (batch 1, --prompt-len), one eager decoding step and one
    decoding step replayed from a CUDA graph (as the benchmark times it), for the fp16 model and the
    --profile-recipe twin (quantized embedding and lm_head)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ssmq.bench.graphs import GraphDecoder, static_cache
    from ssmq.bench.models import DEFAULT_RECIPES, prepare_for_inference, random_fp_model, random_quantized_model
    from ssmq.bench.shapes import shape_config

    cfg = shape_config(args.shape)
    recipe = args.profile_recipe or DEFAULT_RECIPES[cfg.arch]
    out: dict = {}
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    with torch.no_grad():
        for label, build in (("fp16", lambda: random_fp_model(cfg, device)),
                             (recipe, lambda: random_quantized_model(cfg, device, recipe, quantize_embedding=True,
                                                                     quantize_lm_head=True))):
            model = prepare_for_inference(build())
            cache = static_cache(cfg.n_layer)
            tok = model(ids, cache)[:, -1].argmax(-1, keepdim=True)  # warm-up (compiles, validates scales)
            model(tok, cache)
            decoder = GraphDecoder(model, cache, tok)
            phases = {"prefill": lambda: model(ids, static_cache(cfg.n_layer)),
                      "decode step": lambda: model(tok, cache), "decode step (graph)": decoder.step}
            for phase, run in phases.items():
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    run()
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
                rows = sorted(({"kernel": e.key[:90], "us": e.self_device_time_total, "count": e.count}
                               for e in events), key=lambda r: -r["us"])
                total = sum(r["us"] for r in rows)
                out[f"{label} {phase}"] = {"total_us": total, "kernels": rows[:24]}
                log(f"{label} {phase}: {total:.0f} us of kernels")
    return out


def _switch(target: str) -> tuple[object, str]:
    """The module and attribute of a MODULE.NAME switch (ValueError when there is none)."""
    import importlib

    module_name, _, attr = target.rpartition(".")
    if not (module_name and attr):
        raise ValueError(f"{target!r}: expected MODULE.NAME")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name} has no {attr}")
    return module, attr


def set_switch(item: str) -> None:
    """--set MODULE.NAME=VALUE: the switch set to the literal VALUE for the whole run."""
    import ast

    target, _, text = item.partition("=")
    module, attr = _switch(target)
    setattr(module, attr, ast.literal_eval(text))
    log(f"--set {target} = {text}")
    RESULTS.setdefault("set", []).append(item)


def switch_ab(device: torch.device, args: argparse.Namespace) -> dict:
    """Decoding time per token (CUDA graph, batch 1, after a --prompt-len prefill) of the fp16 model and
    the --profile-recipe twin (quantized embedding and lm_head), with a module-level switch of the kernels
    (--ab-switch MODULE.NAME=V1,V2,... or V1;V2;... for values with commas; default PDL on, off, on) set to
    each value in turn, in one run. Several switches move together as MOD.A,MOD.B=(A1,B1);(A2,B2)."""
    import ast

    from ssmq.bench.graphs import GraphDecoder, static_cache
    from ssmq.bench.models import DEFAULT_RECIPES, prepare_for_inference, random_fp_model, random_quantized_model
    from ssmq.bench.shapes import shape_config
    from ssmq.bench.timing import median_ms

    target, _, values = args.ab_switch.partition("=")
    if not values:
        raise ValueError(f"--ab-switch {args.ab_switch!r}: expected MODULE.NAME=V1,V2,...")
    switches = [_switch(name) for name in target.split(",")]
    texts = values.split(";" if ";" in values or "," in target else ",")  # ';' separates values with commas
    settings = [ast.literal_eval(text) for text in texts]  # a typo fails before any model is built
    if len(switches) > 1:
        settings = [tuple(v) if isinstance(v, tuple) and len(v) == len(switches) else None for v in settings]
        if None in settings:
            raise ValueError(f"--ab-switch {args.ab_switch!r}: each value must be a tuple of {len(switches)}")
    else:
        settings = [(v,) for v in settings]
    originals = [getattr(module, attr) for module, attr in switches]
    attr = "/".join(a for _, a in switches)
    cfg = shape_config(args.shape)
    recipe = args.profile_recipe or DEFAULT_RECIPES[cfg.arch]
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    out: dict = {"switch": target}
    try:
        with torch.no_grad():
            for label, build in (("fp16", lambda: random_fp_model(cfg, device)),
                                 (recipe, lambda: random_quantized_model(cfg, device, recipe, quantize_embedding=True,
                                                                         quantize_lm_head=True))):
                model = prepare_for_inference(build())
                for text, values_now in zip(texts, settings):
                    for (module, name), value in zip(switches, values_now):
                        setattr(module, name, value)
                    cache = static_cache(cfg.n_layer)
                    tok = model(ids, cache)[:, -1].argmax(-1, keepdim=True)
                    decoder = GraphDecoder(model, cache, tok)
                    ms = median_ms(lambda: [decoder.step() for _ in range(32)], device, repeats=5) / 32
                    out.setdefault(label, {}).setdefault(text, []).append(round(ms, 4))
                    log(f"{label} {attr}={text}: {ms:.3f} ms per token")
    finally:
        for (module, name), value in zip(switches, originals):
            setattr(module, name, value)
    return out


# ---------------------------------------------------------------- main

def print_summary() -> None:
    mamba2_gpu.summary(RESULTS["stages"])
    checks = RESULTS["stages"].get("checks", {}).get("rows", [])
    if checks:
        print("\n=== kernel checks (vs reference ops) ===")
        for row in checks:
            print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['name']:<48} {row['shape']:<26} {row['result']}")
        print(f"{sum(r['ok'] for r in checks)}/{len(checks)} passed")
    for stage in ("model", "m2model"):
        model = RESULTS["stages"].get(stage)
        if model:
            print(f"\n=== whole models ({stage}) ===")
            for key, value in model.items():
                print(f"{key}: {value}")
    for stage in ("bench", "bench_fp16_head"):
        print_bench(stage, RESULTS["stages"].get(stage))
    tune = RESULTS["stages"].get("tune", {}).get("gemv")
    if tune:
        print("\n=== GEMV (M=1) configurations: default vs fastest bit-exact one (installed for this run) ===")
        for r in tune:
            default = next((c for c in r["configs"] if c["config"] == "default" and "us" in c), None)
            best = r["chosen"]
            print(f"{r['op']:>8} N={r['N']:<6} K={r['K']:<5} default "
                  f"{default['us'] if default else float('nan'):7.1f} us  best "
                  f"{best['us'] if best else float('nan'):7.1f} us ({best['GBps'] if best else 0:5.0f} GB/s) "
                  f"{best['config'] if best else None}")
    prof = RESULTS["stages"].get("profile")
    if prof and "error" not in prof and "skipped" not in prof:
        for key, value in prof.items():
            print(f"\n=== kernels, {key}: {value['total_us']:.0f} us ===")
            for r in value["kernels"][:18]:
                print(f"{r['us']:9.0f} us {r['count']:5d}x  {r['kernel']}")
    scan_cfg = RESULTS["stages"].get("scan", {}).get("scan_configs")
    if scan_cfg:
        print("\n=== prefill scan configs (1, 2048, d_inner) ===")
        for c in scan_cfg:
            print(f"BLOCK_D={c['BLOCK_D']:>3} T={c['T']:>3} warps={c['num_warps']}: {c['us']:8.0f} us")
    lin = RESULTS["stages"].get("linear", {}).get("linear")
    if lin:
        print("\n=== W8A8 linear vs cuBLAS fp16 (median us; GB/s of weights) ===")
        for r in lin:
            best = min((a for a in r["alternatives"] if "us" in a), key=lambda a: a["us"], default=None)
            cfg = {k: v for k, v in (best or {}).items() if k != "us"}
            alt = "" if best is None else f"  best alt {best['us']:.1f} us {cfg}"
            print(f"{r['op']:>8} M={r['M']:<5} w8a8 {r['w8a8_us']:8.1f} ({r['w8a8_GBps']:5.0f} GB/s) fp16 "
                  f"{r['fp16_cublas_us']:8.1f} ({r['fp16_GBps']:5.0f} GB/s){alt}")


def print_bench(stage: str, b: dict | None) -> None:
    if b and "rows" in b:
        s, env = b["settings"], b["environment"]
        title = ("fp16 embedding + lm_head" if stage == "bench_fp16_head"
                 else "int8 embedding + lm_head, one shared table")
        print(f"\n=== benchmark ({title}) {RESULTS.get('shape')}: prompt {s['prompt_len']}, gen {s['gen_len']}; "
              f"{env.get('gpu')}, torch {env['torch']}, triton {env['triton']}, {env['date']} ===")
        print(f"{'batch':>5} {'model':>6} {'TTFT ms':>9} {'TPOT ms':>9} {'tok/s':>9} {'eager ms':>9} "
              f"{'weights MiB':>12} {'cache MiB':>10} {'peak MiB':>9}")
        for row in b["rows"]:
            for key in ("fp16", "w8a8"):
                t = row[key]
                print(f"{row['batch']:>5} {key:>6} {t['ttft_ms']:9.2f} {t['tpot_ms']:9.3f} {t['tokens_per_s']:9.1f} "
                      f"{t['tpot_eager_ms']:9.3f} {t['weight_bytes'] / 2**20:12.1f} {t['cache_bytes'] / 2**20:10.2f} "
                      f"{(t['peak_bytes'] or 0) / 2**20:9.0f}")
            hf = row.get("transformers_fp16")
            r = row["ratios"]["w8a8"]
            print(f"      ratios: TTFT x{r['ttft_speedup']:.2f}, TPOT x{r['tpot_speedup']:.2f}, weights "
                  f"{r['weight_fraction']:.3f}, cache {r['cache_fraction']:.3f}"
                  + (f"; transformers fp16 TPOT {hf['tpot_ms']:.2f} ms = x{hf['fp16_vs_transformers_tpot']:.1f} ours"
                     if hf else ""))


DEFAULT_STAGES = "checks,model,m2model,tune,bench,m2checks,m2time,profile,linear,bench_fp16_head"
STAGE_COST_S = {"checks": 25, "model": 25, "m2model": 40, "tune": 30, "bench": 60, "bench_fp16_head": 30, "profile": 25,
                "linear": 35, "scan": 20, "m2checks": 35, "m2time": 50, "ab": 60}
"""Expected seconds per stage on an H100 with the Triton cache carried (compiling adds ~1 s per kernel);
a stage starts only when it should end within --budget-s."""


def summary() -> dict:
    """The headline numbers of this run, one JSON line (the full results are in gpu_check.json)."""
    st = RESULTS["stages"]
    out: dict = {"gpu": RESULTS.get("gpu", {}).get("name"), "shape": RESULTS.get("shape"),
                 "stage_s": RESULTS.get("stage_s", {}),
                 "stage_status": {k: ("skipped" if "skipped" in v else "error" if "error" in v else "ok")
                                  for k, v in st.items() if isinstance(v, dict)}}
    rows = st.get("checks", {}).get("rows")
    if rows:
        out["checks"] = f"{sum(r['ok'] for r in rows)}/{len(rows)}"
        out["checks_failed"] = [f"{r['name']} {r['shape']}" for r in rows if not r["ok"]]
    for stage in ("bench", "bench_fp16_head"):
        for row in st.get(stage, {}).get("rows", []):
            r, hf = row["ratios"]["w8a8"], row.get("transformers_fp16") or {}
            out[f"{stage} b{row['batch']}"] = {
                "fp16_tpot_ms": row["fp16"]["tpot_ms"], "w8a8_tpot_ms": row["w8a8"]["tpot_ms"],
                "tpot_speedup": r["tpot_speedup"], "ttft_speedup": r["ttft_speedup"],
                "fp16_ttft_ms": row["fp16"]["ttft_ms"], "w8a8_ttft_ms": row["w8a8"]["ttft_ms"],
                "weight_fraction": r["weight_fraction"], "vs_transformers": hf.get("fp16_vs_transformers_tpot")}
    for stage in ("model", "m2model"):
        model = st.get(stage, {})
        if model and "error" not in model and "skipped" not in model:
            out.setdefault("graph_equals_eager", {}).update({k: v for k, v in model.items() if "CUDA-graph" in k})
            out.setdefault("kernels_vs_reference", {}).update(
                {k: v for k, v in model.items() if "kernels vs reference" in k})
    tune = st.get("tune", {})
    if "gemv" in tune:
        out["gemv_chosen"] = {r["op"]: r["chosen"] for r in tune["gemv"]}
    out.update(mamba2_gpu.headline(st))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default=DEFAULT_STAGES)
    p.add_argument("--sweep-linear", action="store_true", help="also time alternative tile shapes (linear stage)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no stage that would end past this many seconds (by STAGE_COST_S)")
    p.add_argument("--m2-budget-s", type=float, default=85.0, help="time for the m2checks + m2time stages together")
    p.add_argument("--shape", default="mamba-2.8b")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--batch", default="1,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--profile-recipe", default=None,
                   help="the quantized model of the profile stage (default: quamba1 / quamba2-w8a8 by architecture)")
    p.add_argument("--ab-switch", default="ssmq.ops.triton.common.USE_PDL=True,False,True",
                   help="the ab stage's switch and values, MODULE.NAME=V1,V2,... (Python literals)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set a module-level switch (a Python literal) for every stage, e.g. "
                        "ssmq.ops.triton.common.PREFETCH_L2='step'; repeatable")
    p.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    args = p.parse_args()
    for item in args.set:
        set_switch(item)
    from ssmq.bench.shapes import shape_config
    from ssmq.models.config import MambaConfig

    if args.dry_run:
        device = torch.device("cpu")
        dispatch.uses_kernels = lambda *tensors: True  # the interpreter stands in for the GPU
        dims = dict(d_model=32, d_inner=64, dt_rank=4, d_state=4, L=20, B=2)
        model_vocab = 64
        model_cfg = MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=64, d_state=4)
        m2_model_cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=8,
                                   ngroups=1, chunk_size=16)
    else:
        device = torch.device("cuda")
        cfg = shape_config(args.shape)
        model_vocab = cfg.vocab_size
        dims = dict(d_model=cfg.d_model, d_inner=cfg.d_inner, dt_rank=cfg.dt_rank, d_state=cfg.d_state, L=2048, B=16)
        model_cfg = shape_config("mamba-130m")
        m2_model_cfg = shape_config("mamba2-130m")
        props = torch.cuda.get_device_properties(device)
        RESULTS["gpu"] = {"name": props.name, "sm": props.multi_processor_count, "memory": props.total_memory}
        log(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    RESULTS["shape"] = args.shape
    stages = args.stages.split(",")
    m2_mode = "dry" if args.dry_run else "gpu"
    runners = {
        "checks": lambda: {"rows": Checks(device, dims).run()},
        "model": lambda: model_checks(device, model_cfg),
        "m2model": lambda: model_checks(device, m2_model_cfg, ("quamba2-w8a8", "quamba2-w4a8", "quamba2-w4a16")),
        "scan": lambda: scan_sweep(device, dims),
        "tune": lambda: tune_gemv(device, dims, model_vocab),
        "bench": lambda: bench(device, args),
        "bench_fp16_head": lambda: bench(device, args, int8_head=False, batches="1", transformers=False),
        "profile": lambda: profile(device, args),
        "ab": lambda: switch_ab(device, args),
        "linear": lambda: linear_micro(device, dims, args.sweep_linear),
        "m2checks": lambda: {"rows": mamba2_gpu.checks(Checks(device, dims), m2_mode, 0.4 * args.m2_budget_s)},
        "m2time": lambda: mamba2_gpu.timings(device, m2_mode, 0.6 * args.m2_budget_s, log),
    }
    for stage in stages:
        if args.dry_run and stage in ("scan", "tune", "bench", "bench_fp16_head", "profile", "linear", "ab"):
            continue
        if stage not in runners:
            log(f"--- stage {stage} unknown (stages: {', '.join(runners)})")
            RESULTS["stages"][stage] = {"error": "unknown stage"}
            continue
        if not args.dry_run and time.time() - T0 + STAGE_COST_S.get(stage, 30.0) > args.budget_s:
            log(f"--- stage {stage} skipped: it would end past the {args.budget_s:.0f} s budget")
            RESULTS["stages"][stage] = {"skipped": "time budget"}
            continue
        started = time.time()
        log(f"--- stage {stage}")
        try:
            RESULTS["stages"][stage] = runners[stage]()
        except Exception as exc:
            traceback.print_exc()
            RESULTS["stages"][stage] = {"error": f"{type(exc).__name__}: {exc}"}
        RESULTS.setdefault("stage_s", {})[stage] = round(time.time() - started, 1)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_summary()
    print("\nSUMMARY_JSON " + json.dumps(summary(), default=str))
    log("done")


if __name__ == "__main__":
    main()
