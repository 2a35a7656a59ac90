"""Mamba2 / 4-bit stages of benchmarks/gpu_check.py: the SSD-scan and W4A16 / W4A8 kernels checked against
their reference ops at mamba2-2.7b shapes, then timed side by side with fp16 and W8A8.

  m2checks  ssd_scan fp16 and int8_ssd_scan (grouped scales) prefill of 2048 tokens with an initial state,
            and their decoding steps (batch 16, static state updated in place); the gated RMSNorm (fp16
            prefill at 2.7b, fp32 batch 16 at 8b with 8 groups); W4A16 / W4A8 linear on
            in_proj (2560 -> 10576) and out_proj (5120 -> 2560) at M = 1 (GEMV), 16 and 2048 (GEMM); in_proj's
            decoding GEMV with the conv step in its epilogue (batch 2) against the two reference ops
  m2time    median us (each from a CUDA graph of many calls, so without the host's launch cost; weights
            cycled through copies so that L2 does not hold them) of fp16 cuBLAS / W8A8 / W4A16 / W4A8 for
            those projections at M = 1 and 2048 and for the mamba2-8b projections and lm_head at M = 1 (with
            a sweep of W4A8 GEMV tiles), the SSD scan fp16 vs int8 (prefill 2048 after a small tile sweep of
            each), and the layer's other decoding ops at batch 1 for both sizes; a layer's decoding step is
            then the sum of its ops' times, per precision
Each stage stops starting new cases past its time budget (--m2-budget-s, split between the two). Modes:
"gpu"; "dry" (`gpu_check.py --dry-run`: tiny shapes on the Triton interpreter, no time budget, to test this
file); "compile" (benchmarks/triton_cache.py: the real shapes' Triton calls once each, on a machine
without a GPU, to fill a Triton cache for the GPU run; no references, no cuBLAS, no comparisons).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ssmq.ops import dispatch, hadamard, int4_linear, int8_conv, int8_scan, norm, quantize, scan
from ssmq.ops.int4 import pack_int4

# mamba2-2.7b: d_model 2560, expand 2, headdim 64, d_state 128, ngroups 1; mamba2-8b-like: d_model 4096, ngroups 8
REAL = dict(d_model=2560, d_inner=5120, headdim=64, d_state=128, ngroups=1, L=2048, B=16)
REAL_8B = dict(d_model=4096, d_inner=8192, headdim=64, d_state=128, ngroups=8)
TINY = dict(d_model=128, d_inner=128, headdim=16, d_state=16, ngroups=2, L=40, B=2)
# W4A8 GEMV alternatives timed at M = 1 beside the default: the byte kernel, and dp4a tiles (rows, groups,
# warps, unrolled steps, X_TILE)
W4A8_GEMV_CONFIGS = [dict(WORDS=0)] + [dict(BLOCK_N=bn, BLOCK_G=bg, num_warps=w, UNROLL=u, X_TILE=xt)
                                       for bn, bg, w, u, xt in (
    (16, 8, 4, 1, 0), (16, 16, 8, 1, 0), (8, 8, 4, 1, 0), (8, 8, 4, 1, 1), (16, 8, 4, 1, 1), (16, 16, 8, 1, 1),
    (8, 16, 4, 1, 1), (4, 16, 4, 1, 1), (4, 32, 4, 1, 1), (2, 32, 2, 1, 1), (8, 32, 8, 1, 1))]
# W4A16 GEMV (bytes) tiles: rows, groups, warps
W4A16_GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_G=bg, num_warps=w) for bn, bg, w in (
    (4, 16, 4), (16, 8, 8), (16, 4, 4), (8, 4, 4))]
# W4A16 dequantization (prefill) tiles: rows, packed bytes, warps
DEQUANT_CONFIGS = [dict(BLOCK_N=bn, BLOCK_J=bj, num_warps=w) for bn, bj, w in (
    (32, 64, 4), (16, 128, 4), (8, 256, 4), (32, 128, 8), (64, 64, 8))]
# conv1d decoding step tiles: channels per program, warps
CONV_STEP_CONFIGS = [dict(BLOCK_C=bc, num_warps=w) for bc, w in ((256, 2), (128, 1), (128, 2), (512, 4), (1024, 4),
                                                                 (64, 1), (512, 2))]
STEP_CONFIGS = [dict(BLOCK_P=bp, num_warps=w) for bp, w in ((16, 2), (8, 1), (8, 2), (16, 4), (32, 4), (64, 4),
                                                              (64, 8), (32, 2))]
SSD_CONFIGS = [dict(BLOCK_P=bp, T=t, num_warps=w, num_stages=st) for bp, t, w, st in (
    (32, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 1), (64, 64, 8, 2), (64, 32, 8, 2))]


def in_proj_dim(d: dict[str, int]) -> int:
    return 2 * d["d_inner"] + 2 * d["ngroups"] * d["d_state"] + d["d_inner"] // d["headdim"]


def _random_int4(n: int, k: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Packed random int4 weights with W4A16 group scales and W4A8 two-level scales (values do not matter
    for timing; for checks every code and group scale value is exercised)."""
    codes = torch.randint(-8, 8, (n, k), device=device, generator=gen, dtype=torch.int8)
    groups = max(1, k // 128)
    return dict(packed=pack_int4(codes), scale=torch.rand(n, groups, device=device, generator=gen) * 0.01 + 1e-3,
                s_c=torch.rand(n, device=device, generator=gen) * 1e-4 + 1e-5,
                g=torch.randint(1, 128, (n, groups), device=device, generator=gen, dtype=torch.int16))


class _Ssd:
    """SSD inputs of one shape: float and int8 (grouped scales) versions, and the scales."""

    def __init__(self, d: dict[str, int], batch: int, length: int, device: torch.device, gen: torch.Generator):
        heads, p, n, g = d["d_inner"] // d["headdim"], d["headdim"], d["d_state"], d["ngroups"]

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, device=device, generator=gen)

        self.A = -torch.arange(1, heads + 1, device=device, dtype=torch.float32) / 4
        self.D = randn(heads)
        self.dt_bias = randn(heads) * 0.5 - 3.0  # softplus ~ 0.05, as trained models
        self.dt = randn(batch, length, heads).half()
        self.x, self.B, self.C = randn(batch, length, heads, p).half(), randn(batch, length, g, n).half(), randn(
            batch, length, g, n).half()
        self.state = randn(batch, heads, p, n) * 0.5
        # grouped scales, Quamba2-like: x per (head, channel) from a 4 x 4 (head group, channel group) table
        table = torch.rand(4, 4, device=device, generator=gen) * 0.02 + 0.02
        self.x_scale = table.repeat_interleave(heads // 4, 0).repeat_interleave(p // 4, 1).contiguous()
        self.B_scale = torch.full((g, 1), 0.03, device=device)
        self.C_scale = torch.full((g, 1), 0.03, device=device)
        self.state_scale = (self.state.abs().amax(dim=(0, 2)) / 127).clamp(min=1e-6)[:, None, :]  # (heads, 1, n)
        self.xq = dispatch.quantize(self.x, self.x_scale)
        self.Bq, self.Cq = dispatch.quantize(self.B, self.B_scale), dispatch.quantize(self.C, self.C_scale)
        self.state_q = dispatch.quantize(self.state, self.state_scale)

    def float_args(self) -> tuple:
        return self.x, self.dt, self.A, self.B, self.C, 256, self.D, self.dt_bias

    def int8_kernel_args(self) -> tuple:
        """The int8 arguments of ssmq.ops.triton.ssd.ssd_scan (to time tile alternatives)."""
        return (self.xq, self.dt, self.A, self.Bq, self.Cq, self.D, self.dt_bias, True, (0.0, float("inf")))

    def scales(self) -> dict[str, torch.Tensor]:
        return {"x": self.x_scale, "B": self.B_scale, "C": self.C_scale, "state": self.state_scale}

    def int8_args(self) -> tuple:
        return (self.xq, self.x_scale, self.dt, self.A, self.Bq, self.B_scale, self.Cq, self.C_scale,
                self.state_scale, 256)


def checks(ck, mode: str, budget_s: float) -> list[dict]:
    """Kernel-vs-reference cases for the new kernels through ssmq.ops.dispatch (`ck` is gpu_check's Checks),
    and for both loops of the W4A8 GEMV (X_TILE 0 and 1, whichever the default picks) directly."""
    from ssmq.ops.triton import w4 as tw4

    d = TINY if mode == "dry" else REAL
    dev, gen = ck.dev, ck.gen
    deadline = time.time() + (budget_s if mode == "gpu" else float("inf"))
    cases: list[tuple[str, str, Callable[[], object], Callable[[], object]]] = []
    L, Bd = d["L"], d["B"]
    heads = d["d_inner"] // d["headdim"]
    pre = _Ssd(d, 1, L, dev, gen)
    shape = f"(1,{L},{heads},{d['headdim']}) n={d['d_state']} g={d['ngroups']}"
    cases.append(("ssd_scan fp16 prefill + state", shape,
                  lambda: dispatch.ssd_scan(*pre.float_args(), state=pre.state),
                  lambda: scan.ssd_scan(*pre.float_args(), state=pre.state)))
    cases.append(("int8_ssd_scan prefill + state, grouped scales", shape,
                  lambda: dispatch.int8_ssd_scan(*pre.int8_args(), D=pre.D, dt_bias=pre.dt_bias, state_q=pre.state_q),
                  lambda: int8_scan.int8_ssd_scan(*pre.int8_args(), D=pre.D, dt_bias=pre.dt_bias,
                                                  state_q=pre.state_q)))
    step = _Ssd(d, Bd, 1, dev, gen)
    fslot = dispatch.mark_static_state(step.state.clone())
    qslot = dispatch.mark_static_state(step.state_q.clone())
    sshape = f"({Bd},1,{heads},{d['headdim']}) n={d['d_state']}"
    cases.append(("ssd_scan fp16 step, state in place", sshape,
                  lambda: (dispatch.ssd_scan(*step.float_args(), state=fslot)[0], fslot),
                  lambda: scan.ssd_scan(*step.float_args(), state=step.state)))
    cases.append(("int8_ssd_scan step, state in place", sshape,
                  lambda: (dispatch.int8_ssd_scan(*step.int8_args(), D=step.D, dt_bias=step.dt_bias,
                                                  state_q=qslot)[0], qslot),
                  lambda: int8_scan.int8_ssd_scan(*step.int8_args(), D=step.D, dt_bias=step.dt_bias,
                                                  state_q=step.state_q)))
    for dims, rows, dtype in ((d, L, torch.float16), (TINY if mode == "dry" else REAL_8B, Bd, torch.float32)):
        width, group = dims["d_inner"], dims["d_inner"] // dims["ngroups"]
        zy = torch.randn(rows, 2 * width, device=dev, generator=gen).to(dtype)  # z: a strided slice
        y, z = zy[:, width:], zy[:, :width]
        nw = (torch.rand(width, device=dev, generator=gen) + 0.5).to(dtype)
        cases.append((f"gated_rms_norm {str(dtype)[6:]}", f"({rows},{width}) group={group}",
                      lambda y=y, z=z, nw=nw, group=group: dispatch.gated_rms_norm(y, z, nw, 1e-5, group),
                      lambda y=y, z=z, nw=nw, group=group: norm.gated_rms_norm(y, z, nw, 1e-5, group)))
        zq = torch.randint(-127, 128, (rows, width), device=dev, generator=gen, dtype=torch.int8)
        zs = torch.rand(width, device=dev, generator=gen) * 0.05 + 0.01
        cases.append((f"gated_rms_norm, int8 gate, {str(dtype)[6:]} y", f"({rows},{width}) group={group}",
                      lambda y=y, zq=zq, zs=zs, nw=nw, group=group: dispatch.dequant_gated_rms_norm(
                          y, zq, zs, nw.float(), 1e-5, group),
                      lambda y=y, zq=zq, zs=zs, nw=nw, group=group: norm.gated_rms_norm(
                          y, zq.float() * zs, nw.float(), 1e-5, group)))
        y16, out_scale = y.half(), torch.tensor(0.04, device=dev)  # into out_proj: norm + Hadamard + quantize
        cases.append(("gated norm + Hadamard + quantize, int8 gate", f"({rows},{width}) group={group}",
                      lambda y16=y16, zq=zq, zs=zs, nw=nw, group=group, os_=out_scale:
                      dispatch.gated_norm_hadamard_quantize(y16, zq, zs, nw.float(), 1e-5, group, os_),
                      lambda y16=y16, zq=zq, zs=zs, nw=nw, group=group, os_=out_scale: quantize.quantize(
                          hadamard.hadamard_transform(norm.gated_rms_norm(y16, zq.float() * zs, nw.float(), 1e-5,
                                                                          group)), os_)))
    for label, nout, k in (("in_proj", in_proj_dim(d), d["d_model"]), ("out_proj", d["d_model"], d["d_inner"])):
        w = _random_int4(nout, k, dev, gen)
        bias = torch.randn(nout, device=dev, generator=gen)
        for m in (1, 16, L) if label == "in_proj" else (1, L):
            x16 = torch.randn(m, k, device=dev, generator=gen).half()
            xq = torch.randint(-128, 128, (m, k), device=dev, generator=gen, dtype=torch.int8)
            xs = torch.rand(m, 1, device=dev, generator=gen) * 0.02 + 1e-3
            out_scale = torch.tensor(0.01, device=dev) if label == "in_proj" else None  # codes up to ~+-100
            cases.append((f"w4a16_linear {label}", f"M={m} N={nout} K={k}",
                          lambda x16=x16, w=w: dispatch.w4a16_linear(x16, w["packed"], w["scale"]),
                          lambda x16=x16, w=w: int4_linear.w4a16_linear(x16, w["packed"], w["scale"])))
            if m == L:  # fp32 activations (fp32 models, e.g. evaluation) take smaller GEMM tiles
                x32 = x16.float()
                cases.append((f"w4a16_linear {label} (fp32 x)", f"M={m} N={nout} K={k}",
                              lambda x32=x32, w=w: dispatch.w4a16_linear(x32, w["packed"], w["scale"]),
                              lambda x32=x32, w=w: int4_linear.w4a16_linear(x32, w["packed"], w["scale"])))
            out_kind = "int8" if out_scale is not None else "fp16"
            cases.append((f"w4a8_linear {label} -> {out_kind}", f"M={m} N={nout} K={k}",
                          lambda xq=xq, xs=xs, w=w, bias=bias, os_=out_scale: dispatch.w4a8_linear(
                              xq, xs, w["packed"], w["s_c"], w["g"], bias, out_scale=os_, constant_weights=True),
                          lambda xq=xq, xs=xs, w=w, bias=bias, os_=out_scale: int4_linear.w4a8_linear(
                              xq, xs, w["packed"], w["s_c"], w["g"], bias, out_scale=os_)))
            # both GEMV loops, whichever the shape's default is (called directly: no weights loaded before the
            # PDL wait, which the case above, a model's call, has)
            for x_tile in (0, 1) if m == 1 else ():
                cases.append((f"w4a8_linear {label} -> {out_kind}, X_TILE {x_tile}", f"M={m} N={nout} K={k}",
                              lambda xq=xq, xs=xs, w=w, bias=bias, os_=out_scale, xt=x_tile: tw4.w4a8_linear(
                                  xq, xs, w["packed"], w["s_c"], w["g"], bias, out_scale=os_,
                                  config={"X_TILE": xt}),
                              lambda xq=xq, xs=xs, w=w, bias=bias, os_=out_scale: int4_linear.w4a8_linear(
                                  xq, xs, w["packed"], w["s_c"], w["g"], bias, out_scale=os_)))
    # in_proj's decoding GEMV with the conv step in its epilogue, against the reference projection then conv
    nout, k, start = in_proj_dim(d), d["d_model"], d["d_inner"]
    channels = d["d_inner"] + 2 * d["ngroups"] * d["d_state"]
    w = _random_int4(nout, k, dev, gen)
    xq = torch.randint(-128, 128, (2, 1, k), device=dev, generator=gen, dtype=torch.int8)
    xs = torch.rand(2, 1, 1, device=dev, generator=gen) * 0.02 + 1e-3
    os_ = torch.rand(nout, device=dev, generator=gen) * 0.02 + 0.005
    cw = torch.randint(-127, 128, (channels, 4), device=dev, generator=gen, dtype=torch.int8)
    cws, cos = (torch.rand(channels, device=dev, generator=gen) * 0.01 + 1e-3 for _ in range(2))
    cb = torch.randn(channels, device=dev, generator=gen)
    cstate = torch.randint(-128, 128, (2, 3, channels), device=dev, generator=gen, dtype=torch.int8)

    def fused() -> tuple:
        return dispatch.w4a8_linear_conv_step(xq, xs, w["packed"], w["s_c"], w["g"], None, os_, start, cw, cws, cb,
                                              cos, dispatch.mark_static_state(cstate.clone()), constant_weights=True)

    def apart() -> tuple:
        proj = int4_linear.w4a8_linear(xq, xs, w["packed"], w["s_c"], w["g"], None, out_scale=os_)
        return (proj, *int8_conv.int8_causal_conv1d_silu(proj[..., start:start + channels], os_[start:start + channels],
                                                          cw, cws, cb, cos, cstate.clone()))

    cases.append(("w4a8_linear_conv_step (in_proj + conv step)", f"B=2 N={nout} K={k} conv {channels}", fused,
                  apart))
    for name, shp, kernel, reference in cases:
        if mode == "compile":
            kernel()
        elif time.time() > deadline:
            ck.rows.append({"name": name, "shape": shp, "ok": False, "result": "skipped: m2checks time budget"})
        else:
            ck.case(name, shp, kernel, reference)
    return ck.rows


def _bench(fn: Callable[[], object], mode: str) -> float:
    """Median time of fn in us, from a CUDA graph of many calls (no host launch cost in the number, as in
    the benchmark's graph decoding); one untimed call unless on a GPU."""
    if mode != "gpu":
        fn()
        return float("nan")
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=10, return_mode="median") * 1e3


def timings(device: torch.device, mode: str, budget_s: float, log: Callable[[str], None]) -> dict:
    """Side-by-side kernel times (see the module docstring); rows of {op, variant, us}."""
    from ssmq.ops.triton import linear as tlinear
    from ssmq.ops.triton import ssd as tssd
    from ssmq.ops.triton import w4 as tw4

    deadline = time.time() + (budget_s if mode == "gpu" else float("inf"))
    gen = torch.Generator(device).manual_seed(5)
    dry = mode == "dry"
    out: dict = {"rows": [], "cases_skipped": []}

    def row(op: str, variant: str, fn: Callable[[], object], triton: bool = True) -> float | None:
        if mode == "compile" and not triton:
            return None
        if time.time() > deadline:
            out["cases_skipped"].append(f"{op} {variant}")
            return None
        try:
            us = _bench(fn, mode)
        except Exception as exc:  # one failing variant must not hide the others
            out["rows"].append({"op": op, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:200]})
            log(f"{op} {variant}: error {exc}")
            return None
        out["rows"].append({"op": op, "variant": variant, "us": us})
        log(f"{op} {variant}: {us:.1f} us")
        return us

    d = TINY if dry else REAL
    s = torch.tensor(0.01, device=device)
    copies = {"gpu": 6, "dry": 2}.get(mode, 1)
    shapes = [("in_proj", d, in_proj_dim(d), d["d_model"], (1, d["L"])),
              ("out_proj", d, d["d_model"], d["d_inner"], (1, d["L"]))]
    if not dry:
        shapes += [("8b in_proj", REAL_8B, in_proj_dim(REAL_8B), REAL_8B["d_model"], (1,)),
                   ("8b out_proj", REAL_8B, REAL_8B["d_model"], REAL_8B["d_inner"], (1,)),
                   ("8b lm_head", REAL_8B, 256000, REAL_8B["d_model"], (1,))]
    step_ops: dict[str, dict[str, dict[str, float | None]]] = {}
    for label, dims, nout, k, ms in shapes:
        w16 = [torch.randn(nout, k, device=device, generator=gen).half() for _ in range(copies)]
        w8 = [torch.randint(-127, 128, (nout, k), device=device, generator=gen, dtype=torch.int8)
              for _ in range(copies)]
        w4 = [_random_int4(nout, k, device, gen) for _ in range(copies)]
        ws8 = torch.rand(nout, device=device, generator=gen) * 1e-3 + 1e-4
        for m in ms:
            x16 = torch.randn(m, k, device=device, generator=gen).half()
            xq = torch.randint(-127, 128, (m, k), device=device, generator=gen, dtype=torch.int8)
            it = iter(range(10 ** 9))
            op = f"{label} M={m} N={nout} K={k}"
            times = {
                "fp16 cuBLAS": row(op, "fp16 cuBLAS", lambda: torch.nn.functional.linear(x16, w16[next(it) % copies]),
                                   triton=False),
                "w8a8": row(op, "w8a8", lambda: tlinear.int8_linear(xq, s, w8[next(it) % copies], ws8,
                                                                    out_dtype=torch.float16)),
                "w4a16": row(op, "w4a16", lambda: tw4.w4a16_linear(x16, w4[next(it) % copies]["packed"],
                                                                   w4[0]["scale"])),
                "w4a8": row(op, "w4a8", lambda: tw4.w4a8_linear(xq, s, w4[next(it) % copies]["packed"], w4[0]["s_c"],
                                                                w4[0]["g"], out_dtype=torch.float16)),
            }
            if m > 1:
                row(op, "w4a8 tiled GEMM (INT_MM=0)", lambda: tw4.w4a8_linear(
                    xq, s, w4[next(it) % copies]["packed"], w4[0]["s_c"], w4[0]["g"], out_dtype=torch.float16,
                    config={"INT_MM": 0}))
            for cfg in DEQUANT_CONFIGS if m > 1 else ():
                row(op, "w4a16 dequantize only " + ",".join(f"{v}" for v in cfg.values()),
                    lambda cfg=cfg: tw4.dequantize_w4a16(w4[next(it) % copies]["packed"], w4[0]["scale"],
                                                         torch.float16, cfg))
            for cfg in W4A8_GEMV_CONFIGS if m == 1 else ():
                row(op, _variant("w4a8", cfg),
                    lambda cfg=cfg: tw4.w4a8_linear(xq, s, w4[next(it) % copies]["packed"], w4[0]["s_c"], w4[0]["g"],
                                                    out_dtype=torch.float16, config=cfg))
            for cfg in W4A16_GEMV_CONFIGS if m == 1 else ():
                row(op, _variant("w4a16", cfg),
                    lambda cfg=cfg: tw4.w4a16_linear(x16, w4[next(it) % copies]["packed"], w4[0]["scale"],
                                                     config=cfg))
            if m == 1 and not label.endswith("lm_head"):
                step_ops.setdefault(_size(dims), {})[label.split()[-1]] = times
    # SSD scan prefill: a small tile sweep for each of fp16 and int8, then the two side by side, each with
    # its best tiles
    pre = _Ssd(d, 1, d["L"], device, gen)
    no_limit = (0.0, float("inf"))
    runs = {"fp16": lambda cfg: tssd.ssd_scan(pre.x, pre.dt, pre.A, pre.B, pre.C, pre.D, pre.dt_bias, True, no_limit,
                                              None, torch.float32, config=cfg),
            "int8": lambda cfg: tssd.ssd_scan(pre.xq, pre.dt, pre.A, pre.Bq, pre.Cq, pre.D, pre.dt_bias, True,
                                              no_limit, None, torch.float16, config=cfg,
                                              scales={"x": pre.x_scale, "B": pre.B_scale, "C": pre.C_scale,
                                                      "state": pre.state_scale})}
    best: dict[str, tuple[float, dict]] = {}
    for kind, run in runs.items():
        for cfg in SSD_CONFIGS[:1] if dry else SSD_CONFIGS:
            us = row(f"ssd prefill {kind} (1,{d['L']}) tiles", str(cfg), lambda cfg=cfg, run=run: run(cfg))
            if us is not None and (kind not in best or us < best[kind][0]):
                best[kind] = (us, cfg)
    out["ssd_configs_best"] = {k: v[1] for k, v in best.items()}
    op = f"ssd_scan prefill (1,{d['L']},{d['d_inner'] // d['headdim']},{d['headdim']}) n={d['d_state']}, best tiles"
    for kind, (_, cfg) in best.items():
        row(op, kind, lambda run=runs[kind], cfg=cfg: run(cfg))
    for dims in (d,) if dry else (REAL_8B, d):
        step_ops.setdefault(_size(dims), {}).update(_step_ops(dims, device, gen, row, s))
    out["layer_step_us"] = {size: layer_step(ops) for size, ops in step_ops.items()}
    for size, steps in out["layer_step_us"].items():
        for variant, us in steps.items():
            log(f"{size} per-layer decoding step (sum of ops), {variant}: {us:.1f} us")
    return out


def _variant(kind: str, cfg: dict[str, int]) -> str:
    return f"{kind} bytes" if cfg.get("WORDS") == 0 else f"{kind} " + ",".join(f"{v}" for v in cfg.values())


def _size(d: dict[str, int]) -> str:
    return f"d_model {d['d_model']}"


def _step_ops(d: dict[str, int], device: torch.device, gen: torch.Generator, row: Callable, s: torch.Tensor
              ) -> dict[str, dict[str, float | None]]:
    """The times of a Mamba2 layer's decoding ops other than its projections, batch 1, at dims `d` (and
    of some alternative tiles of the SSD step and the gated norm)."""
    from ssmq.ops.triton import conv as tconv
    from ssmq.ops.triton import hadamard as thad
    from ssmq.ops.triton import norm as tnorm
    from ssmq.ops.triton import ssd as tssd

    size = _size(d)
    one = _Ssd(d, 1, 1, device, gen)
    fslot, qslot = dispatch.mark_static_state(one.state.clone()), dispatch.mark_static_state(one.state_q.clone())
    op = f"{size}: ssd_scan decoding step, batch 1"
    ops = {"ssd step": {
        "fp16": row(op, "fp16", lambda: dispatch.ssd_scan(*one.float_args(), state=fslot)),
        "int8": row(op, "int8", lambda: dispatch.int8_ssd_scan(*one.int8_args(), D=one.D, dt_bias=one.dt_bias,
                                                               state_q=qslot)),
    }}
    for cfg in STEP_CONFIGS:
        row(op, f"int8 {cfg}", lambda cfg=cfg: tssd.ssd_scan(*one.int8_kernel_args(), qslot, torch.float16,
                                                             scales=one.scales(), inplace=True, config=cfg))
    cdim = d["d_inner"] + 2 * d["ngroups"] * d["d_state"]
    xc, wc = torch.randn(1, 1, cdim, device=device, generator=gen).half(), torch.randn(cdim, 4, device=device).half()
    cstate = dispatch.mark_static_state(torch.zeros(1, 3, cdim, device=device, dtype=torch.float16))
    xcq, wcq = torch.randint(-127, 128, (1, 1, cdim), device=device, dtype=torch.int8), torch.randint(
        -127, 128, (cdim, 4), device=device, dtype=torch.int8)
    cqstate = dispatch.mark_static_state(torch.zeros(1, 3, cdim, device=device, dtype=torch.int8))
    op = f"{size}: conv1d + SiLU step, batch 1"
    ch_s = [torch.rand(cdim, device=device, generator=gen) * 0.01 + 1e-3 for _ in range(3)]  # as the models:
    bias = torch.randn(cdim, device=device, generator=gen)  # per-channel x, weight and output scales, a bias
    ops["conv step"] = {
        "fp16": row(op, "fp16", lambda: dispatch.causal_conv1d_silu(xc, wc, None, cstate)),
        "int8": row(op, "int8", lambda: dispatch.int8_causal_conv1d_silu(xcq, ch_s[0], wcq, ch_s[1], bias, ch_s[2],
                                                                         cqstate)),
    }
    for cfg in CONV_STEP_CONFIGS:
        row(op, f"fp16 {cfg}", lambda cfg=cfg: tconv.conv1d(xc, wc, None, cstate, tconv.OUT_SILU, inplace=True,
                                                            config=cfg))
        row(op, f"int8 {cfg}", lambda cfg=cfg: tconv.conv1d(xcq, wcq, bias, cqstate, tconv.OUT_Q8, *ch_s,
                                                            inplace=True, config=cfg))
    y, z = (torch.randn(1, 1, d["d_inner"], device=device).half() for _ in range(2))
    nw = torch.rand(d["d_inner"], device=device).half() + 0.5
    group = d["d_inner"] // d["ngroups"]
    op = f"{size}: gated RMSNorm step, batch 1"
    ops["gated norm"] = {"fp16": row(op, "fp16", lambda: dispatch.gated_rms_norm(y, z, nw, 1e-5, group))}
    for warps in (4, 8, 16, 32):
        row(op, f"fp16 {warps} warps", lambda w=warps: tnorm.gated_rms_norm(y, z, nw, 1e-5, group,
                                                                            config={"num_warps": w}))
    hid, res, nw2 = (torch.randn(1, 1, d["d_model"], device=device).half() for _ in range(3))
    op = f"{size}: residual add + RMSNorm step, batch 1"
    ops["add norm"] = {
        "fp16": row(op, "fp16", lambda: dispatch.add_rms_norm(hid, res, nw2, 1e-5)),
        "int8": row(op, "int8 (quantize fused)", lambda: dispatch.int8_add_rms_norm(hid, res, nw2, 1e-5, s)),
    }
    ops["hadamard"] = {"fp16": 0.0, "int8": row(f"{size}: Hadamard + quantize before out_proj, batch 1", "int8",
                                                lambda: dispatch.hadamard_quantize(y, s))}
    zq, nw32 = torch.randint(-127, 128, (1, 1, d["d_inner"]), device=device, dtype=torch.int8), nw.float()
    op = f"{size}: gated norm (int8 z) + Hadamard + quantize, batch 1"
    row(op, "int8 (dispatch's choice)", lambda: dispatch.gated_norm_hadamard_quantize(y, zq, s, nw32, 1e-5,
                                                                                      group, s))
    row(op, "int8 two kernels", lambda: dispatch.hadamard_quantize(
        dispatch.dequant_gated_rms_norm(y, zq, s, nw32, 1e-5, group), s))

    def fused(cfg: dict[str, int] | None) -> torch.Tensor:
        """The fused kernel at a decoding size, which it may decline by default (FUSED_NORM_MIN_ROWS)."""
        default, thad.FUSED_NORM_MIN_ROWS = thad.FUSED_NORM_MIN_ROWS, 1
        try:
            return thad.gated_norm_hadamard(y, zq, nw32, 1e-5, group, s, s, cfg)
        finally:
            thad.FUSED_NORM_MIN_ROWS = default

    for cfg in (None, {"PB": 32, "num_warps": 8}):
        row(op, f"int8 fused {cfg or 'default tiles'}", lambda cfg=cfg: fused(cfg))
    return ops


def layer_step(ops: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """A Mamba2 layer's decoding step as the sum of its ops' times (each from a CUDA graph, so launch gaps
    inside a graph are counted once per op), per precision: fp16 (cuBLAS GEMVs; fp16 add + norm, conv, scan
    and gated norm kernels), w8a8 / w4a8 (their GEMVs; int8 add + norm + quantize, conv, scan, gated norm
    on int8 z, timed as the fp16 one, and the Hadamard + quantize before out_proj), w4a16 (its GEMVs, the fp16
    ops)."""
    total = {}
    for variant in ("fp16 cuBLAS", "w8a8", "w4a16", "w4a8"):
        act = "fp16" if variant in ("fp16 cuBLAS", "w4a16") else "int8"
        parts = [ops.get("in_proj", {}).get(variant), ops.get("out_proj", {}).get(variant),
                 ops.get("ssd step", {}).get(act), ops.get("conv step", {}).get(act),
                 ops.get("add norm", {}).get(act), ops.get("hadamard", {}).get(act),
                 ops.get("gated norm", {}).get("fp16")]
        if all(p is not None and p == p for p in parts):
            total[variant] = float(sum(parts))
    return total


def summary(stages: dict) -> None:
    """Print the two stages' tables (called from gpu_check's print_summary)."""
    rows = stages.get("m2checks", {}).get("rows", [])
    if rows:
        print("\n=== Mamba2 / 4-bit kernel checks (vs reference ops) ===")
        for r in rows:
            print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['name']:<48} {r['shape']:<34} {r['result']}")
        print(f"{sum(r['ok'] for r in rows)}/{len(rows)} passed")
    t = stages.get("m2time", {})
    if t.get("rows"):
        print("\n=== Mamba2 / 4-bit kernel times (median us) ===")
        by_op: dict[str, dict[str, object]] = {}
        for r in t["rows"]:
            by_op.setdefault(r["op"], {})[r["variant"]] = r.get("us", r.get("error"))
        for op, variants in by_op.items():
            base = variants.get("fp16 cuBLAS", variants.get("fp16"))
            cells = []
            for v, us in variants.items():
                ratio = (f" (x{base / us:.2f})" if isinstance(us, float) and isinstance(base, float) and us == us
                         and us > 0 else "")
                cells.append(f"{v} {us:.1f}{ratio}" if isinstance(us, float) else f"{v} {us}")
            print(f"{op:<48} " + " | ".join(cells))
        for size, lay in t.get("layer_step_us", {}).items():
            base = lay.get("fp16 cuBLAS")
            print(f"{size}: per-layer decoding step, sum of op times (us): " + " | ".join(
                f"{k} {v:.1f}" + (f" (x{base / v:.2f})" if base else "") for k, v in lay.items()))
        if t.get("cases_skipped"):
            print(f"skipped (time budget): {', '.join(t['cases_skipped'])}")


def headline(stages: dict) -> dict:
    """The two stages' headline numbers for gpu_check's SUMMARY_JSON line."""
    out: dict = {}
    rows = stages.get("m2checks", {}).get("rows")
    if rows:
        out["m2checks"] = f"{sum(r['ok'] for r in rows)}/{len(rows)}"
        out["m2checks_failed"] = [f"{r['name']} {r['shape']}: {r['result']}" for r in rows if not r["ok"]]
    t = stages.get("m2time", {})
    times: dict[str, dict[str, float]] = {}
    for r in t.get("rows", []):
        if "us" in r and ("M=1 " in r["op"] or "M=2048" in r["op"] or r["op"].startswith("ssd_scan")):
            times.setdefault(r["op"], {})[r["variant"]] = round(r["us"], 1)
    if times:
        out["m2time_us"] = times
    if t.get("layer_step_us"):
        out["m2_layer_step_us"] = {size: {k: round(v, 1) for k, v in lay.items()}
                                   for size, lay in t["layer_step_us"].items()}
    return out
