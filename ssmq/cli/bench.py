"""`ssmq bench`: fp16 and quantized (W8A8, W4A8, W4A16) timings and memory, side by side, in one run."""

from __future__ import annotations

import click

from ssmq.api import load
from ssmq.bench.models import bench_recipes, prepare_for_inference, random_fp_model, random_twins
from ssmq.bench.run import BenchSettings, Comparison, compare_models
from ssmq.bench.shapes import SHAPES, shape_config
from ssmq.cli.format import echo_json, echo_table
from ssmq.errors import SsmqError
from ssmq.models.device import parse_device
from ssmq.quant.qmodel import QuantizedMambaLM

MIB = 2 ** 20
# table rows: title, Timing field, divisor, ratio key (None: no ratio), ratio suffix
METRICS = (("time to first token (ms)", "ttft_ms", 1, "ttft_speedup", "x"),
           ("time per output token (ms)", "tpot_ms", 1, "tpot_speedup", "x"),
           ("tokens/s", "tokens_per_s", 1, None, ""),
           ("time per token, eager (ms)", "tpot_eager_ms", 1, None, ""),
           ("weights (MiB)", "weight_bytes", MIB, "weight_fraction", ""),
           ("decode cache (MiB)", "cache_bytes", MIB, "cache_fraction", ""),
           ("peak memory (MiB)", "peak_bytes", MIB, "peak_fraction", ""))


def _batches(value: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise SsmqError(f"--batch takes comma-separated positive integers, got {value!r}") from None
    if not batches or min(batches) < 1:
        raise SsmqError(f"--batch takes comma-separated positive integers, got {value!r}")
    return batches


def _recipes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")]
    if not all(names):
        raise SsmqError(f"--recipes takes comma-separated recipe names, got {value!r}")
    return names


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if abs(v) < 1e4 else f"{v:.0f}{unit}"


def _print(result: Comparison) -> None:
    s, env, labels = result.settings, result.environment, result.labels
    click.echo(f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    click.echo(f"prompt {s['prompt_len']} tokens, {s['gen_len']} new tokens; ratio = fp16 / model for times, "
               f"model / fp16 for bytes")
    for row in result.rows:
        graphs = row["fp16"]["cuda_graphs"]
        click.echo(f"\nbatch {row['batch']}" + (" (decoding replays a CUDA graph)" if graphs else ""))
        table = []
        for title, key, divisor, ratio, suffix in METRICS:
            values = [row[m][key] for m in ("fp16", *labels)]
            cells = [_fmt(v / divisor if v else None) for v in values]
            ratio_cells = [_fmt(row["ratios"][label][ratio], suffix) if ratio else "" for label in labels]
            table.append((title, *cells, *ratio_cells))
        echo_table(("", "fp16", *labels, *(f"ratio {label}" for label in labels)), table)
        hf = row.get("transformers_fp16")
        if hf:
            click.echo(f"transformers fp16, per token: {_fmt(hf['tpot_ms'])} ms "
                       f"({_fmt(hf['fp16_vs_transformers_tpot'], 'x')} = theirs / our fp16)")


@click.command("bench")
@click.argument("model", required=False)
@click.option("--shape", type=click.Choice(list(SHAPES)), help="Random weights of a released model's shape "
              "(instead of MODEL).")
@click.option("--recipes", help="Quantized twins to time, comma-separated recipe names (ssmq quantize --help lists "
              "them), e.g. quamba2-w8a8,quamba2-w4a8,quamba2-w4a16. Default: quamba1 for Mamba1, quamba2-w8a8 for "
              "Mamba2. Not with QMODEL (the checkpoint is the quantized model).")
@click.option("--prompt-len", default=1024, show_default=True, type=click.IntRange(min=1), help="Prompt tokens.")
@click.option("--gen-len", default=128, show_default=True, type=click.IntRange(min=1), help="Tokens to decode.")
@click.option("--batch", "batch", default="1,16", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--device", default="auto", show_default=True, help="cuda, cuda:N, cpu or auto.")
@click.option("--no-transformers", is_flag=True, help="Skip timing transformers' MambaForCausalLM (it is timed "
              "for Mamba1 shapes only).")
@click.option("--int8-head", is_flag=True, help="Twins with a quantized embedding and lm_head instead of fp16 ones, "
              "in each recipe's weight format: int8 for the W8A8 recipes (one shared table with tied embeddings), "
              "int4 with group scales for quamba2-w4a8 and quamba2-w4a16 (W4A8 / W4A16 lm_head).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def bench_cmd(model: str | None, shape: str | None, recipes: str | None, prompt_len: int, gen_len: int, batch: str,
              repeats: int, device: str, no_transformers: bool, int8_head: bool, as_json: bool) -> None:
    """Time MODEL_OR_QMODEL in fp16 and quantized in the same run: time to first token, time per output
    token, tokens/s, weight, cache and peak memory, with their ratios (one column per model, one ratio
    column per quantized model).

    MODEL (fp checkpoint, Mamba1 or Mamba2) is benchmarked against a quantized twin of its shape per
    recipe of --recipes, QMODEL (ssmq quantized checkpoint) against an fp16 twin; twins' weights are
    random (timing does not depend on them). With --shape all models are random. Real speed needs a CUDA
    GPU with Triton.

    JSON rows: {"batch", "fp16": timing, RECIPE: timing per quantized model, "ratios": {RECIPE: ratios}},
    with "transformers_fp16" where transformers was timed; "models" lists the quantized models' labels.
    """
    if (model is None) == (shape is None):
        raise SsmqError("give either MODEL_OR_QMODEL or --shape (one of them)")
    names, batches = _recipes(recipes), _batches(batch)
    dev = parse_device(device)
    if shape is not None:
        cfg = shape_config(shape)
        chosen = bench_recipes(names, cfg.arch)
        fp, twins = random_fp_model(cfg, dev), random_twins(cfg, dev, chosen, quantized_head=int8_head)
    else:
        loaded, _ = load(model, device=dev, dtype="fp16")
        if isinstance(loaded, QuantizedMambaLM):
            if names is not None:
                raise SsmqError(f"{model}: is a quantized checkpoint, timed against a random fp16 twin; --recipes "
                                "applies to fp models and --shape")
            fp, twins = random_fp_model(loaded.config, dev), {loaded.quant_config["recipe"]["name"]: loaded}
        else:
            chosen = bench_recipes(names, loaded.config.arch)
            fp, twins = loaded, random_twins(loaded.config, dev, chosen, quantized_head=int8_head)
    settings = BenchSettings(prompt_len=prompt_len, gen_len=gen_len, batches=batches, repeats=repeats,
                             transformers=not no_transformers, int8_head=int8_head)
    result = compare_models(prepare_for_inference(fp), {k: prepare_for_inference(m) for k, m in twins.items()},
                            settings)
    if as_json:
        echo_json({"settings": result.settings, "environment": result.environment, "models": result.labels,
                   "rows": result.rows})
    else:
        _print(result)
