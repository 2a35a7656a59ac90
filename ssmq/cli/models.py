"""`ssmq info` and `ssmq generate`."""

from __future__ import annotations

import click

from ssmq.api import load
from ssmq.cli.format import echo_json, human_count
from ssmq.eval.generate import generate
from ssmq.models.describe import describe_model


@click.command("info")
@click.argument("model")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info_cmd(model: str, tokenizer: str | None, as_json: bool) -> None:
    """Describe MODEL: architecture, shapes, parameter counts, dtypes, tokenizer."""
    d = describe_model(model, tokenizer)
    if as_json:
        echo_json(d)
        return
    click.echo(f"model       {d['path']}")
    click.echo(f"arch        {d['arch']} ({d['kind']})")
    click.echo("shapes      " + ", ".join(f"{k}={v}" for k, v in d["shapes"].items()))
    p = d["parameters"]
    click.echo(f"parameters  {human_count(p['total'])} total, {human_count(p['embedding'])} embedding, "
               f"{human_count(p['per_block'])} per block, lm_head {'tied' if d['tie_embeddings'] else human_count(p['lm_head'])}")
    click.echo("dtypes      " + ", ".join(f"{k}: {human_count(v)}" for k, v in d["dtypes"].items()))
    click.echo("bytes       " + ", ".join(f"{k}: {human_count(v)}B" for k, v in d["tensor_bytes"].items()))
    tok = d["tokenizer"]
    click.echo(f"tokenizer   {tok['path']} ({tok['vocab_size']} ids)" if tok else "tokenizer   none (pass --tokenizer)")
    q = d.get("quantization")
    if q:
        click.echo(f"recipe      {q['recipe']} ({q['activations']} activations, {q['weight_granularity']} weight "
                   f"scales, transforms: {', '.join(q['transforms']) or 'none'})")
        click.echo("modules     " + ", ".join(f"{k} x{v}" for k, v in q["modules"].items()))
        click.echo(f"scales      {q['scales']} activation scales (ssmq scales list {d['path']})")
        data = q["calibration"].get("data")
        if data:
            click.echo(f"calibrated  {data['n']} docs x {data['seqlen']} tokens of {data['file']} "
                       f"(sha256 {data['sha256'][:12]}), seed {data['seed']}")
        click.echo(f"source      {q['source_model'].get('path')} (sha256 {q['source_model'].get('sha256', '')[:12]})")


@click.command("generate")
@click.argument("model")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 means greedy decoding.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default=None, help="fp32, fp16 or bf16 (default: as stored).")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, ids, timings) as JSON at the end.")
def generate_cmd(model: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 device: str, dtype: str | None, tokenizer: str | None, as_json: bool) -> None:
    """Continue --prompt with MODEL, streaming tokens as they are produced (a decode cache is used)."""
    lm, tok = load(model, tokenizer=tokenizer, device=device, dtype=dtype)
    stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
    if not as_json:
        click.echo(prompt, nl=False)
    g = generate(lm, tok, prompt, max_new_tokens, temperature, top_p, seed, on_text=stream)
    if as_json:
        echo_json({"prompt": g.prompt, "text": g.text, "prompt_tokens": len(g.prompt_ids),
                   "new_ids": g.new_ids, "prefill_seconds": g.prefill_seconds,
                   "decode_seconds": g.decode_seconds, "tokens_per_second": g.tokens_per_second})
    else:
        click.echo()
        click.echo(f"[{len(g.new_ids)} tokens, prefill {g.prefill_seconds * 1000:.0f} ms, "
                   f"{g.tokens_per_second:.1f} tokens/s]", err=True)
