"""`ssmq calibrate`."""

from __future__ import annotations

import click
import torch

from ssmq.cli.format import echo_json, echo_table
from ssmq.quant.calibrate import calibrate
from ssmq.quant.quantize import calibrate_for_recipe
from ssmq.quant.rules import PRESETS


def _value_text(values: list | float) -> str:
    """A scalar as is; a per-group or per-channel value as its max and shape."""
    t = torch.tensor(values)
    if t.dim() == 0:
        return f"{float(t):.6g}"
    return f"max {float(t.max()):.6g} [{'x'.join(map(str, t.shape))}]"


@click.command("calibrate")
@click.argument("model")
@click.option("--data", type=click.Path(), default=None,
              help="JSONL (a 'text' field per line) or plain text. Default: ../shared/data/pile-val-512.jsonl, "
                   "documents 0-255.")
@click.option("--n", type=int, default=None, help="Documents to use (default: 512, or all of the data if fewer).")
@click.option("--seqlen", type=int, default=512, show_default=True,
              help="Tokens per document (longer ones are truncated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the document choice.")
@click.option("--rules", "rules", multiple=True, metavar="RULES",
              help="PATTERN=OBSERVER rules or a preset name, repeatable or ';'-separated, applied in order on top of "
                   f"the architecture's preset (presets: {', '.join(PRESETS)}). "
                   "E.g. 'layers.*.conv.out=percentile(alpha=0.9999)'.")
@click.option("--recipe", default=None,
              help="Calibrate the model as this quantization recipe transforms it (e.g. quamba1: folded norms, "
                   "Hadamard-rotated out_proj input), with its rules; the statistics then feed "
                   "`ssmq quantize --recipe R --stats`.")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Documents per forward (padding is masked; 1 is Quamba's setting).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored).")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Statistics directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
def calibrate_cmd(model: str, data: str | None, n: int | None, seqlen: int, seed: int, rules: tuple[str, ...],
                  recipe: str | None, batch_size: int, device: str, dtype: str | None, tokenizer: str | None, output: str,
                  overwrite: bool, as_json: bool) -> None:
    """Record activation statistics of every scale tap of MODEL and write them to OUTPUT.

    Each tap gets the observer of the last rule matching it; the statistics kept also allow
    re-deriving any tap's value under another rule later without running the model again.
    """
    if recipe is None:
        stats = calibrate(model, tokenizer, data, n=n, seqlen=seqlen, seed=seed, rules=list(rules),
                          batch_size=batch_size, device=device, dtype=dtype, output=output, overwrite=overwrite)
    else:
        stats = calibrate_for_recipe(model, recipe, tokenizer=tokenizer, data=data, n=n, seqlen=seqlen, seed=seed,
                                     rules=rules, batch_size=batch_size, device=device, dtype=dtype,
                                     output=output, overwrite=overwrite)
    d = stats.provenance["data"]
    speed = {"seconds": stats.seconds, "tokens_per_second": d["tokens"] / stats.seconds}
    summary = stats.summary()
    if as_json:
        echo_json({"output": output, **speed, "provenance": stats.provenance, "alphas": list(stats.alphas),
                   "taps": summary})
        return
    rows = [(name, s["observer"], f"{s['absmax']:.6g}", _value_text(s["value"]), _value_text(s["scale"]))
            for name, s in summary.items()]
    echo_table(["tap", "observer", "absmax", "value", "scale"], rows)
    click.echo(f"{d['n']} documents, {d['tokens']} tokens in {speed['seconds']:.1f} s "
               f"({speed['tokens_per_second']:.0f} tokens/s) on {stats.provenance['device']}; "
               f"statistics written to {output}")
