"""Fill a Triton cache for the GPU run of benchmarks/gpu_check.py on a machine without a GPU, in two steps.

Triton's cache key hashes its own `libtriton.so`, which differs between the wheels of different Python
versions; the device runs Python 3.12. So the kernels must be compiled by a Python 3.12 with the same
triton wheel (3.6.0), where torch need not be installed:

  1. record (any Python with torch and ssmq's dependencies): run the kernel launches of gpu_check.py's
     stages on CPU tensors, with a stand-in CUDA driver; a Triton cache hook records each launch's
     specialization (Triton's own serialized form: argument types, divisibility by 16, constexprs,
     options) and stops it there, so nothing is compiled or run:
         PYTHONPATH=. python benchmarks/triton_cache.py record --out /tmp/triton_specs.json
  2. compile (Python 3.12 with triton 3.6.0): `preload` each recorded specialization for sm_90, which
     compiles it (ptxas of the wheel) into the cache directory under the key the device computes:
         PYTHONPATH=. python3.12 benchmarks/triton_cache.py compile --specs /tmp/triton_specs.json \\
             --cache-dir .triton_cache
Triton finds an entry's files by the absolute paths listed in its `__grp__*.json`; the compile step
rewrites them relative to the repository root (`--path-prefix`, default the --cache-dir as given), where
the GPU command runs, and keeps only the metadata and cubin of each entry. Then carry `.triton_cache` and
run gpu_check.py from the repository root with TRITON_CACHE_DIR=.triton_cache.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("common", "conv", "hadamard", "linear", "norm", "quant", "scan", "ssd", "w4")


class TargetOnlyDriver:
    """Just enough of a CUDA driver for Triton's JIT to specialize and compile for `arch`."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):  # noqa: ANN201 (Triton's type)
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _record_workload() -> None:
    """The kernel launches of gpu_check.py's stages (checks, model, tune, bench, profile, linear,
    bench_fp16_head, and the Mamba2 stages of benchmarks/mamba2_gpu.py), with tensors of the same shapes,
    dtypes and strides as on the GPU; outputs are never computed."""
    import torch
    import triton.testing

    sys.argv = [sys.argv[0]]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    import mamba2_gpu

    from ssmq.bench.models import TAP_SCALES, prepare_for_inference
    from ssmq.bench.shapes import shape_config
    from ssmq.models.lm import MambaLM
    from ssmq.ops import dispatch
    from ssmq.ops.triton import linear as tlinear
    from ssmq.quant.plan import build_plan, convert, scale_names, shares_int8_table, tie_int8_table
    from ssmq.quant.qmodel import QuantizedMambaLM, store_float_params
    from ssmq.quant.recipes import get_recipe
    from ssmq.quant.scalebook import ScaleBook, ScaleEntry

    cpu = torch.device("cpu")
    dispatch.uses_kernels = lambda *tensors: True  # CPU tensors stand in for CUDA ones
    triton.testing.do_bench = lambda fn, *a, **k: (fn(), 1.0)[1]
    torch.nn.functional.linear = lambda x, w, b=None: torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)

    def run(label: str, fn) -> None:  # noqa: ANN001
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # one failing workload must not stop the others
            print(f"  {label}: {type(exc).__name__}: {exc}"[:300])
        print(f"  {label}: {time.time() - t0:.0f} s", flush=True)

    def empty_model(cfg, quantized: bool, int8_head: bool = False) -> MambaLM:  # noqa: ANN001
        with torch.device("meta"):
            model = MambaLM(cfg)
        if not quantized:
            model.half().to_empty(device=cpu)
            if cfg.tie_embeddings:
                model.lm_head.weight = model.backbone.embeddings.weight
            return prepare_for_inference(model.eval())
        r = get_recipe("quamba1")
        plan = build_plan(cfg, r, quantize_embedding=int8_head, quantize_lm_head=int8_head)
        book = ScaleBook({n: ScaleEntry(torch.tensor(TAP_SCALES[n.split(".", 2)[-1] if n.startswith("layers.")
                                                                 else n]), "stand-in") for n in scale_names(plan)})
        convert(model, plan, book, dynamic=False, from_float=False)
        model.to_empty(device=cpu)
        for name, buf in model.named_buffers():
            if name.endswith("weight_scale"):
                buf.fill_(0.01)
        if shares_int8_table(plan, cfg):
            tie_int8_table(model)
        elif cfg.tie_embeddings:
            model.lm_head.weight = model.backbone.embeddings.weight
        store_float_params(model)
        return QuantizedMambaLM(model, book, {"plan": plan}).eval()

    @torch.no_grad()
    def forward_paths(model: MambaLM, prompts: tuple[tuple[int, int], ...], decode_batches: tuple[int, ...]) -> None:
        from ssmq.bench.graphs import static_cache

        vocab, n_layer = model.config.vocab_size, model.config.n_layer
        for shape in prompts:
            model(torch.randint(0, vocab, shape), model.new_cache())
        for batch in decode_batches:
            cache = static_cache(n_layer)
            tok = model(torch.randint(0, vocab, (batch, 8)), cache)[:, -1].argmax(-1, keepdim=True)
            for _ in range(2):
                tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)

    big = shape_config("mamba-2.8b")
    dims = dict(d_model=big.d_model, d_inner=big.d_inner, dt_rank=big.dt_rank, d_state=big.d_state, L=2048, B=16)
    checks = gpu_check.Checks(cpu, dims)
    checks.case = lambda name, shape, kernel, reference: run(f"check {name} {shape}", kernel)
    run("checks", checks.run)
    small = shape_config("mamba-130m")
    for label, quantized, head in (("fp16", False, False), ("w8a8", True, False), ("w8a8 int8 head", True, True)):
        run(f"model stage {label}", lambda: forward_paths(empty_model(small, quantized, head), ((2, 64),), (2,)))
    run("tune", lambda: gpu_check.tune_gemv(cpu, dims, big.vocab_size))
    tlinear.GEMV_TUNED.clear()
    run("linear", lambda: gpu_check.linear_micro(cpu, dims, False))
    for label, quantized, head, batches in (("fp16", False, False, (1, 16)), ("w8a8 int8 head", True, True, (1, 16)),
                                            ("w8a8 fp16 head", True, False, (1,))):
        run(f"bench {label}", lambda: forward_paths(empty_model(big, quantized, head), ((1, 2048), (2, 2048)),
                                                    batches))
    stand_in = types.SimpleNamespace(dev=cpu, gen=torch.Generator(cpu).manual_seed(0), rows=[])
    run("m2checks", lambda: mamba2_gpu.checks(stand_in, "compile", 0.0))
    run("m2time", lambda: mamba2_gpu.timings(cpu, "compile", 0.0, lambda msg: None))


def _launch_as_on_the_gpu(arch: int) -> None:
    """The recorded CPU launches take the launch options the GPU's would: programmatic dependent launch
    and the norm kernels' L2 prefetches on sm_90 and newer (ssmq.ops.triton.common.pdl_options and
    prefetch_options, which are off for CPU tensors)."""
    options = {"PDL": arch >= 90, "launch_pdl": arch >= 90}
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"ssmq.ops.triton.{name}")
        if hasattr(module, "pdl_options"):
            module.pdl_options = lambda device: dict(options)
        if hasattr(module, "prefetch_options"):
            module.prefetch_options = lambda device: {**options, "PREFETCH": options["PDL"]}


def record(out: Path, arch: int) -> None:
    from triton import knobs
    from triton.runtime.driver import driver

    driver.set_active(TargetOnlyDriver(arch))
    _launch_as_on_the_gpu(arch)
    specs: dict[str, dict[str, str]] = {}

    def hook(*, fn, compile, **_):  # noqa: ANN001, ANN202 (Triton's hook protocol)
        data = compile["specialization_data"]
        specs.setdefault(data, {"module": fn.module, "name": fn.name, "data": data})
        return True  # recorded: skip compiling and launching

    knobs.runtime.jit_cache_hook = hook
    t0 = time.time()
    _record_workload()
    out.write_text(json.dumps(list(specs.values())))
    print(f"recorded {len(specs)} kernel specializations in {time.time() - t0:.0f} s -> {out}")


def _import_kernels_without_torch() -> None:
    """Import ssmq.ops.triton.* where torch is not installed: a stand-in `torch` module serves the module-level
    names they touch, and the ssmq packages are bare (their __init__ files import much more)."""
    if importlib.util.find_spec("torch") is None:
        stub = types.ModuleType("torch")

        class Tensor:  # `torch.Tensor | float` at module level
            pass

        stub.Tensor = Tensor
        stub.__getattr__ = lambda name: Tensor  # dtypes and the like, only compared or stored
        sys.modules["torch"] = stub
    for pkg, path in (("ssmq", ROOT / "ssmq"), ("ssmq.ops", ROOT / "ssmq" / "ops"),
                      ("ssmq.ops.triton", ROOT / "ssmq" / "ops" / "triton")):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            sys.modules[pkg] = module
    sys.modules["ssmq.ops.triton"].HAS_TRITON = True


def compile_specs(specs_file: Path, cache_dir: Path, arch: int) -> None:
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir.resolve())
    from triton.runtime.driver import driver

    _import_kernels_without_torch()
    driver.set_active(TargetOnlyDriver(arch))
    specs = json.loads(specs_file.read_text())
    t0, failed = time.time(), 0
    for spec in specs:
        try:
            fn = getattr(importlib.import_module(spec["module"]), spec["name"])
            fn.preload(spec["data"])
        except Exception as exc:  # report and go on: the device compiles what is missing
            failed += 1
            print(f"{spec['module']}.{spec['name']}: {type(exc).__name__}: {exc}"[:300])
    print(f"compiled {len(specs) - failed} of {len(specs)} specializations for sm_{arch} in {time.time() - t0:.0f} s "
          f"into {cache_dir} (Python {sys.version.split()[0]})")


def relocate(cache_dir: Path, prefix: str) -> None:
    """Make the cache usable from another machine. Each entry's `__grp__*.json` lists its files by absolute
    path, and Triton uses an entry only where those paths exist; rewrite them as `prefix/<entry>/<file>`
    (prefix relative to the directory the GPU command runs in, e.g. `.triton_cache` from the repository
    root), and keep only what a launch reads (the metadata JSON and the cubin), which also keeps the
    directory small enough to carry."""
    kept = removed = 0
    for grp in cache_dir.glob("*/__grp__*.json"):
        children = json.loads(grp.read_text())["child_paths"]
        keep = {name: f"{prefix}/{grp.parent.name}/{name}" for name in children if name.endswith((".json", ".cubin"))}
        for name in children:
            if name not in keep and (grp.parent / name).exists():
                (grp.parent / name).unlink()
                removed += 1
        grp.write_text(json.dumps({"child_paths": keep}))
        kept += 1
    print(f"{kept} entries now refer to {prefix}/...; {removed} intermediate files removed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--out", type=Path, required=True)
    comp = sub.add_parser("compile")
    comp.add_argument("--specs", type=Path, required=True)
    comp.add_argument("--cache-dir", type=Path, default=Path(".triton_cache"))
    comp.add_argument("--path-prefix", default=None,
                      help="how the GPU command reaches the cache directory (default: --cache-dir as given)")
    for sp in (rec, comp):
        sp.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100, H200)")
    args = p.parse_args()
    if args.command == "record":
        record(args.out, args.arch)
    else:
        compile_specs(args.specs, args.cache_dir, args.arch)
        relocate(args.cache_dir, args.path_prefix or str(args.cache_dir))


if __name__ == "__main__":
    main()
