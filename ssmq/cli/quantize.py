"""`ssmq quantize`."""

from __future__ import annotations

from pathlib import Path

import click

from ssmq.cli.format import echo_json, echo_table
from ssmq.errors import SsmqError
from ssmq.models.checkpoint import check_output_dir
from ssmq.models.registry import resolve_model_dir
from ssmq.models.tokenizer import find_tokenizer
from ssmq.quant.qmodel import save_quantized
from ssmq.quant.quantize import quantize
from ssmq.quant.recipes import RECIPES


@click.command("quantize")
@click.argument("model")
@click.option("--recipe", default="quamba1", show_default=True, type=click.Choice(list(RECIPES)),
              help="quamba1 (W8A8, percentile + Hadamard), minmax-static or dynamic (baselines), "
              "quamba2-w4a8 / quamba2-w4a16 (GPTQ int4 weights).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Quantized checkpoint directory to write.")
@click.option("--stats", type=click.Path(), help="Statistics from `ssmq calibrate --recipe ...` (skips calibration).")
@click.option("--data", type=click.Path(), help="Calibration text (JSONL `text` field or plain text); "
              "default: ../shared/data/pile-val-512.jsonl documents 0-255.")
@click.option("--n", default=None, type=int, help="Calibration documents (default: 512, or all if fewer).")
@click.option("--seqlen", default=512, show_default=True, type=int, help="Tokens per calibration document.")
@click.option("--seed", default=0, show_default=True, type=int, help="Calibration document selection seed.")
@click.option("--alpha", type=float, help="Percentile alpha for the recipe's percentile scales (quamba1: 0.9995).")
@click.option("--rules", multiple=True, help="Extra scale rules, e.g. 'layers.0-3.conv.out=percentile(alpha=1.0)'; "
              "later rules win.")
@click.option("--quantize-embedding", is_flag=True, help="int8 embedding with per-row scales (int4 rows, group "
              "scales, with the 4-bit recipes).")
@click.option("--quantize-lm-head", is_flag=True, help="W8A8 lm_head (per-row weight scales, norm_f.out scale); "
              "GPTQ W4A8 / W4A16 with the 4-bit recipes.")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("--device", default="cpu", show_default=True, help="Device for calibration.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def quantize_cmd(model: str, recipe: str, output: str, stats: str | None, data: str | None, n: int | None, seqlen: int,
                 seed: int, alpha: float | None, rules: tuple[str, ...], quantize_embedding: bool,
                 quantize_lm_head: bool, tokenizer: str | None, device: str, overwrite: bool, as_json: bool) -> None:
    """Quantize MODEL with a recipe and write a quantized checkpoint directory."""
    source = resolve_model_dir(model)
    if Path(output).resolve() == source.resolve():
        raise SsmqError(f"{output}: the output directory is the source model; choose another")
    check_output_dir(Path(output), overwrite)
    qm = quantize(source, recipe, tokenizer=tokenizer, stats=stats, data=data, n=n, seqlen=seqlen, seed=seed,
                  alpha=alpha, rules=rules, quantize_embedding=quantize_embedding,
                  quantize_lm_head=quantize_lm_head, device=device, progress=not as_json)
    tok = find_tokenizer(source, Path(tokenizer) if tokenizer else None)
    save_quantized(qm, Path(output), tok, overwrite=overwrite)
    rows = [(name, e.observer, e.describe_value()) for name, e in qm.scales.items()]
    if as_json:
        echo_json({"output": output, "recipe": recipe, "scales": len(rows),
                   "calibration": qm.quant_config["calibration"], "source_model": qm.quant_config["source_model"]})
        return
    click.echo(f"wrote {output} (recipe {recipe}, {len(rows)} activation scales)")
    if rows:
        echo_table(["scale", "observer", "value"], rows[:8])
        if len(rows) > 8:
            click.echo(f"... {len(rows) - 8} more (ssmq scales list {output})")
