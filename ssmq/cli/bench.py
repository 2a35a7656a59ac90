"""`ssmq bench`: fp16 and W8A8 timings and memory, side by side, in one run."""

from __future__ import annotations

import click

from ssmq.api import load
from ssmq.bench.models import prepare_for_inference, random_fp_model, random_w8a8_model
from ssmq.bench.run import BenchSettings, Comparison, compare
from ssmq.bench.shapes import SHAPES, shape_config
from ssmq.cli.format import echo_json, echo_table
from ssmq.errors import SsmqError
from ssmq.models.device import parse_device
from ssmq.quant.qmodel import QuantizedMambaLM

MIB = 2 ** 20


def _batches(value: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise SsmqError(f"--batch takes comma-separated positive integers, got {value!r}") from None
    if not batches or min(batches) < 1:
        raise SsmqError(f"--batch takes comma-separated positive integers, got {value!r}")
    return batches


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if abs(v) < 1e4 else f"{v:.0f}{unit}"


def _print(result: Comparison) -> None:
    s, env = result.settings, result.environment
    click.echo(f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    click.echo(f"prompt {s['prompt_len']} tokens, {s['gen_len']} new tokens; ratio = fp16 / w8a8 for times, "
               f"w8a8 / fp16 for bytes")
    for row in result.rows:
        fp, q, r = row["fp16"], row["w8a8"], row["ratios"]
        click.echo(f"\nbatch {row['batch']}" + (" (decoding replays a CUDA graph)" if q["cuda_graphs"] else ""))
        table = [
            ("time to first token (ms)", _fmt(fp["ttft_ms"]), _fmt(q["ttft_ms"]), _fmt(r["ttft_speedup"], "x")),
            ("time per output token (ms)", _fmt(fp["tpot_ms"]), _fmt(q["tpot_ms"]), _fmt(r["tpot_speedup"], "x")),
            ("tokens/s", _fmt(fp["tokens_per_s"]), _fmt(q["tokens_per_s"]), ""),
            ("time per token, eager (ms)", _fmt(fp["tpot_eager_ms"]), _fmt(q["tpot_eager_ms"]), ""),
            ("weights (MiB)", _fmt(fp["weight_bytes"] / MIB), _fmt(q["weight_bytes"] / MIB),
             _fmt(r["weight_fraction"])),
            ("decode cache (MiB)", _fmt(fp["cache_bytes"] / MIB), _fmt(q["cache_bytes"] / MIB),
             _fmt(r["cache_fraction"])),
            ("peak memory (MiB)", _fmt(fp["peak_bytes"] / MIB if fp["peak_bytes"] else None),
             _fmt(q["peak_bytes"] / MIB if q["peak_bytes"] else None), _fmt(r["peak_fraction"])),
        ]
        hf = row.get("transformers_fp16")
        if hf:
            table.append(("transformers fp16, per token (ms)", _fmt(hf["tpot_ms"]), "",
                          _fmt(r["fp16_vs_transformers_tpot"], "x (theirs / our fp16)")))
        echo_table(("", "fp16", "w8a8", "ratio"), table)


@click.command("bench")
@click.argument("model", required=False)
@click.option("--shape", type=click.Choice(list(SHAPES)), help="Random weights of a released model's shape "
              "(instead of MODEL).")
@click.option("--prompt-len", default=1024, show_default=True, type=click.IntRange(min=1), help="Prompt tokens.")
@click.option("--gen-len", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens to decode.")
@click.option("--batch", "batch", default="1,16", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N, cpu or auto.")
@click.option("--no-transformers", is_flag=True, help="Skip timing transformers' MambaForCausalLM.")
@click.option("--int8-head", is_flag=True, help="Random W8A8 twin with int8 embedding and lm_head (one shared "
              "table) instead of fp16 ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def bench_cmd(model: str | None, shape: str | None, prompt_len: int, gen_len: int, batch: str, repeats: int,
              device: str, no_transformers: bool, int8_head: bool, as_json: bool) -> None:
    """Time MODEL_OR_QMODEL in fp16 and W8A8 in the same run: time to first token, time per output token,
    tokens/s, weight, cache and peak memory, with their ratios.

    MODEL (fp checkpoint) is benchmarked against a W8A8 twin of its shape, QMODEL (ssmq quantized
    checkpoint) against an fp16 twin; the twin's weights are random (timing does not depend on them).
    With --shape both models are random. Real speed needs a CUDA GPU with Triton.
    """
    if (model is None) == (shape is None):
        raise SsmqError("give either MODEL_OR_QMODEL or --shape (one of them)")
    dev = parse_device(device)
    if shape is not None:
        cfg = shape_config(shape)
        fp, q = random_fp_model(cfg, dev), random_w8a8_model(cfg, dev, int8_head=int8_head)
    else:
        loaded, _ = load(model, device=dev, dtype="fp16")
        if loaded.config.arch != "mamba1":
            raise SsmqError(f"{model}: ssmq bench times Mamba1 models (the W8A8 kernels are Mamba1's); "
                            f"this one is {loaded.config.arch}")
        if isinstance(loaded, QuantizedMambaLM):
            fp, q = random_fp_model(loaded.config, dev), loaded
        else:
            fp, q = loaded, random_w8a8_model(loaded.config, dev, int8_head=int8_head)
    settings = BenchSettings(prompt_len=prompt_len, gen_len=gen_len, batches=_batches(batch), repeats=repeats,
                             transformers=not no_transformers, int8_head=int8_head)
    result = compare(prepare_for_inference(fp), prepare_for_inference(q), settings)
    if as_json:
        echo_json({"settings": result.settings, "environment": result.environment, "rows": result.rows})
    else:
        _print(result)
