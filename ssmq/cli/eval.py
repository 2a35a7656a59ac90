"""`ssmq eval`: perplexity of a model on a data file."""

from __future__ import annotations

import click

from ssmq.api import load
from ssmq.cli.format import echo_json
from ssmq.eval.perplexity import WIKITEXT_TEST, evaluate_ppl, parse_ranges


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model."""


@eval_group.command("ppl")
@click.argument("model")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help=f"Text file (WikiText-2 raw convention) or JSONL of {{\"text\": ...}} rows "
                   f"[default: the shared {WIKITEXT_TEST}].")
@click.option("--docs", default=None, help="JSONL documents to use, inclusive ranges such as 0-63 [default: all].")
@click.option("--seqlen", default=2048, show_default=True, type=int, help="Tokens per window.")
@click.option("--limit", default=None, type=int, help="Score at most N windows [default: all].")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored).")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the result, with its provenance, as JSON.")
def ppl_cmd(model: str, data: str | None, docs: str | None, seqlen: int, limit: int | None, batch_size: int,
            device: str, dtype: str | None, tokenizer: str | None, as_json: bool) -> None:
    """Perplexity of MODEL: non-overlapping windows of --seqlen tokens, the last partial one dropped."""
    lm, tok = load(model, tokenizer=tokenizer, device=device, dtype=dtype)
    result = evaluate_ppl(lm, tok, data, seqlen, limit, docs=parse_ranges(docs) if docs else None,
                          batch_size=batch_size, progress=not as_json)
    result = {"model": model, **result}
    if as_json:
        echo_json(result)
        return
    click.echo(f"ppl {result['ppl']:.4f}  {result['data_file']} ({result['documents']}), "
               f"{result['n_windows']} windows x {seqlen} tokens, {result['dtype']} on {result['device']}")
