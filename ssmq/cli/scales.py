"""`ssmq scales list|explain|analyze|set|derive|diff` and `ssmq sweep alpha`."""

from __future__ import annotations

from typing import Any

import click

from ssmq.cli.format import echo_json, echo_table
from ssmq.eval.perplexity import WIKITEXT_TEST
from ssmq.quant.analyze import analyze_scales
from ssmq.quant.edit import derive_scales, set_scales
from ssmq.quant.inspect import diff_scales, explain_scale, list_scales, observer_text
from ssmq.quant.recipes import RECIPES
from ssmq.quant.sweep import METRICS, sweep_alpha

def _num(v: Any) -> str:
    """A scalar, or a grouped value as min..max [shape]."""
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v['min']:.4g}..{v['max']:.4g} [{'x'.join(map(str, v['shape']))}]"
    return f"{v:.4g}"


def _group_rows(tables: dict[str, list[Any]]) -> list[tuple[Any, ...]]:
    """Rows (SSD group, head group, quantity, one column per channel group) of [G, head groups, channel
    groups] tables, one quantity after the other within each head group."""
    first = next(iter(tables.values()))
    return [(g, h, name, *(f"{v:.4g}" for v in table[g][h]))
            for g in range(len(first)) for h in range(len(first[g])) for name, table in tables.items()]


def _echo_groups(title: str, tables: dict[str, list[Any]]) -> None:
    click.echo(f"\n{title} per [SSD group, head group, channel group]")
    width = len(next(iter(tables.values()))[0][0])
    echo_table(["SSD group", "head group", "scale", *(f"ch group {k}" for k in range(width))], _group_rows(tables))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


@click.group("scales")
def scales_group() -> None:
    """List, explain, analyze, edit, derive and diff the quantization scales of a model.

    QMODEL is an ssmq quantized checkpoint; list, explain, analyze (without --stats) and diff also
    read Quamba checkpoints (a directory or a .bin/.pt/.safetensors state dict)."""


@scales_group.command("list")
@click.argument("qmodel")
@click.option("--layers", help="Layers to show: N, A-B or A,B,C.")
@click.option("--match", help="Tap pattern, e.g. 'layers.*.conv.out' or '*.ssm.state'.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(qmodel: str, layers: str | None, match: str | None, as_json: bool) -> None:
    """One row per logical scale: observer, parameters, value and consumers."""
    result = list_scales(qmodel, layers, match)
    if as_json:
        echo_json(result)
        return
    rows = [(r["name"], "-" if r["layer"] is None else r["layer"], r["tap"], r["quamba_key"],
             observer_text(r["observer"], r["params"]),
             _num(r["value"]), ", ".join([r["producer"], *r["consumers"]])) for r in result["scales"]]
    echo_table(["scale", "layer", "tap", "quamba key", "observer", "value", "producer, consumers"], rows)
    s = result["summary"]
    counts = ", ".join(f"{n} {kind}" for kind, n in s["observers"].items())
    click.echo(f"{s['scales']} scales ({result['format']} {result['arch']} checkpoint): {counts}")
    if s["percentile"]:
        where = "; ".join(f"{tap} in layers {layers}" for tap, layers in s["percentile"].items())
        click.echo(f"percentile observers: {where}")
    for r in result["scales"]:
        if r["groups"] is not None:
            _echo_groups(r["name"], {r["tap"]: r["groups"]})
    for r in result["scales"]:
        for issue in r["issues"]:
            click.echo(f"warning: {r['name']}: {issue}")


@scales_group.command("explain")
@click.argument("qmodel")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def explain_cmd(qmodel: str, name: str, as_json: bool) -> None:
    """Where scale NAME is observed, the statistic behind it, where it is stored, and what each consumer does."""
    e = explain_scale(qmodel, name)
    if as_json:
        echo_json(e)
        return

    def use(u: dict[str, Any]) -> str:
        kind = f" [{u['kind']}]" if u["kind"] else ""
        return f"{u['module']}{kind} {u['reads']}: {u['action']}: {u['how']}"

    o, st = e["observed"], e["statistic"]
    lines = [("scale", f"{e['name']} = {_num(e['value'])}  (Quamba: {e['quamba_key'] or '-'})"),
             ("observed", f"tap {o['tap']} in {o['site']}"), ("", f"{o['tensor']}, {o['layout']}")]
    lines += [("", o["note"])] if o["note"] else []
    lines += [("statistic", observer_text(st["observer"], st["params"])), ("", st["description"])]
    if st["calibration"]:
        lines += [("", "calibration: " + ", ".join(f"{k}={v}" for k, v in st["calibration"].items()))]
    lines += [("stored" if i == 0 else "", s) for i, s in enumerate(e["stored"])]
    lines += [("producer", use(e["producer"]))]
    lines += [("consumers" if i == 0 else "", use(u)) for i, u in enumerate(e["consumers"])]
    lines += [("edits" if i == 0 else "", f"{ed['when']} {ed['who']}: {ed['what']}: {ed['old']} -> {ed['new']}")
              for i, ed in enumerate(e["edits"])]
    lines += [("warning", issue) for issue in e["issues"]]
    for label, text in lines:
        click.echo(f"{label:<10} {text}")


@scales_group.command("analyze")
@click.argument("qmodel")
@click.option("--stats", type=click.Path(), help="Calibration statistics of the model QMODEL was quantized from.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the per-layer scales and clipping.")
@click.option("--docs", default=4, show_default=True, type=int,
              help="Calibration documents to run for the pre/post-SiLU conv ranges (with --stats).")
@click.option("--device", default="cpu", show_default=True, help="Device for the pre/post-SiLU pass.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def analyze_cmd(qmodel: str, stats: str | None, plot: str | None, docs: int, device: str, as_json: bool) -> None:
    """Per layer: x_scale, wx_scale, x_out_scale and their ratio; with --stats also clipping, INT8
    utilisation, SQNR vs min-max and the pre/post-SiLU conv output range."""
    result = analyze_scales(qmodel, stats, plot, docs, device)
    if as_json:
        echo_json(result)
        return
    echo_table(["layer", "x_scale", "w_scale", "wx_scale", "x_out_scale", "x_out/wx"],
               [(r["layer"], _num(r["x_scale"]), _num(r["w_scale"]), _num(r["wx_scale"]), _num(r["x_out_scale"]),
                 _num(r["ratio"])) for r in result["layers"]])
    for r in result["layers"]:
        if r.get("groups"):
            _echo_groups(f"layer {r['layer']}: x_scale (in_proj.x), wx_scale, x_out_scale (conv.x), x_out/wx",
                         r["groups"])
    if "scales" in result:
        click.echo("")
        rows = []
        for r in result["scales"]:
            groups = r["groups_clipping"]
            note = f"{groups[0]}/{groups[1]} groups clip" if groups else ""
            note = note or ("grouped: vs its largest scale" if r["grouped"] else "")
            sqnr = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
            clipped = ("≥" if r["grouped"] else "") + _pct(r["clipped"])
            rows.append((r["name"], _num(r["scale"]), f"{r['absmax']:.4g}", clipped, _pct(r["utilisation"]), sqnr,
                         f"{r['sqnr_minmax_db']:.2f}", note))
        echo_table(["scale", "value", "absmax", "clipped", "int8 use", "SQNR dB", "minmax dB", "note"], rows)
    if result.get("conv_ranges"):
        click.echo(f"\nconv output range over {result['conv_ranges_docs']} calibration documents")
        echo_table(["layer", "pre-SiLU min", "pre-SiLU max", "post-SiLU min", "post-SiLU max"],
                   [(r["layer"], f"{r['pre_min']:.4g}", f"{r['pre_max']:.4g}", f"{r['post_min']:.4g}",
                     f"{r['post_max']:.4g}") for r in result["conv_ranges"]])
    for note in result["notes"]:
        click.echo(f"note: {note}")
    if "plot" in result:
        click.echo(f"plot written to {result['plot']}")


def _echo_changes(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(result)
        return
    echo_table(["scale", "old", "new"], [(c["name"], _num(c["old"]), _num(c["new"])) for c in result["changes"]])
    click.echo(f"wrote {result['output']} ({result['op']} {result['what']}: {len(result['changes'])} scales; "
               f"source {result['source']} unchanged)")


@scales_group.command("set")
@click.argument("qmodel")
@click.option("--scale", "pattern", required=True, help="Scale name or pattern, e.g. 'layers.23.conv.out'.")
@click.option("--value", type=float, help="New value (every entry of a grouped scale).")
@click.option("--multiply", type=float, help="Multiply the current value by this factor.")
@click.option("--from", "from_model", type=click.Path(), help="Take the values from another quantized checkpoint.")
@click.option("-o", "--output", required=True, type=click.Path(), help="New checkpoint directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def set_cmd(qmodel: str, pattern: str, value: float | None, multiply: float | None, from_model: str | None,
            output: str, overwrite: bool, as_json: bool) -> None:
    """Write a copy of QMODEL with edited scales; the edit is logged in its provenance."""
    _echo_changes(set_scales(qmodel, output, pattern, value=value, multiply=multiply, from_model=from_model,
                             overwrite=overwrite), as_json)


@scales_group.command("derive")
@click.argument("qmodel")
@click.option("--stats", required=True, type=click.Path(), help="Calibration statistics of QMODEL's source model.")
@click.option("--rule", "rules", required=True, multiple=True,
              help="PATTERN=OBSERVER, e.g. 'layers.*.conv.out=percentile(0.9999)'; repeatable, later rules win.")
@click.option("-o", "--output", required=True, type=click.Path(), help="New checkpoint directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def derive_cmd(qmodel: str, stats: str, rules: tuple[str, ...], output: str, overwrite: bool, as_json: bool) -> None:
    """Write a copy of QMODEL with scales re-derived by other observers from saved statistics (no model run)."""
    _echo_changes(derive_scales(qmodel, stats, rules, output, overwrite), as_json)


@scales_group.command("diff")
@click.argument("qa")
@click.argument("qb")
@click.option("--rel", is_flag=True, help="Show relative changes, largest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff_cmd(qa: str, qb: str, rel: bool, as_json: bool) -> None:
    """Per-scale change from QA to QB; scales that did not move; scales on one side only."""
    d = diff_scales(qa, qb)
    if as_json:
        echo_json(d)
        return
    rows = d["scales"]
    if rel:
        rows = sorted(rows, key=lambda r: -abs(r.get("rel", 0.0)))
    change = (lambda r: f"{100 * r['rel']:+.4g}%") if rel else (lambda r: f"{r['abs']:+.4g}")
    echo_table(["scale", "A", "B", "change (rel)" if rel else "change", "note"],
               [(r["name"], _num(r["a"]), _num(r["b"]), change(r) if "rel" in r else "-",
                 " ".join(x for x in (r["flag"], r.get("observer", "")) if x)) for r in rows])
    moved = len(rows) - len(d["unchanged"])
    click.echo(f"{len(rows)} scales in both: {moved} moved, {len(d['unchanged'])} unchanged")
    for side, key in (("A", "only_a"), ("B", "only_b")):
        if d[key]:
            click.echo(f"only in {side} ({len(d[key])}): {', '.join(d[key])}")


@click.group("sweep")
def sweep_group() -> None:
    """Sweep a quantization parameter: one checkpoint and one evaluation per value."""


@sweep_group.command("alpha")
@click.argument("model")
@click.option("--alphas", required=True, help="Comma-separated percentile α values, e.g. 0.999,0.9999,1.0.")
@click.option("--scales", "patterns", help="Comma-separated scale patterns to sweep "
              "[default: the recipe's percentile scales, quamba1: *.conv.out,*.ssm.state].")
@click.option("--eval", "metric", type=click.Choice(METRICS), default="ppl", show_default=True,
              help="Evaluation of each checkpoint.")
@click.option("-o", "--output", type=click.Path(), help="Sweep directory [default: <model>-alpha-sweep].")
@click.option("--recipe", default="quamba1", show_default=True, type=click.Choice(list(RECIPES)))
@click.option("--data", type=click.Path(), help="Calibration text [default: pile-val-512.jsonl documents 0-255].")
@click.option("--n", type=int, help="Calibration documents [default: 512, or all if fewer].")
@click.option("--seqlen", default=512, show_default=True, type=int, help="Tokens per calibration document.")
@click.option("--seed", default=0, show_default=True, type=int, help="Calibration document selection seed.")
@click.option("--eval-data", type=click.Path(), help=f"Perplexity text [default: {WIKITEXT_TEST}].")
@click.option("--eval-seqlen", default=2048, show_default=True, type=int, help="Tokens per perplexity window.")
@click.option("--limit", type=int, help="Score at most N perplexity windows [default: all].")
@click.option("--tokenizer", type=click.Path(), help="Tokenizer JSON (default: tokenizer.json in MODEL).")
@click.option("--device", default="cpu", show_default=True, help="Device for calibration and evaluation.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sweep_alpha_cmd(model: str, alphas: str, patterns: str | None, metric: str, output: str | None, recipe: str,
                    data: str | None, n: int | None, seqlen: int, seed: int, eval_data: str | None, eval_seqlen: int,
                    limit: int | None, tokenizer: str | None, device: str, overwrite: bool, as_json: bool) -> None:
    """Calibrate MODEL once, write one checkpoint per α, evaluate each; print one table."""
    output = output or f"{model.rstrip('/').rsplit('/', 1)[-1]}-alpha-sweep"
    result = sweep_alpha(model, alphas, output, recipe=recipe, metric=metric,
                         scales=[p.strip() for p in patterns.split(",")] if patterns else None,
                         tokenizer=tokenizer, data=data, n=n, seqlen=seqlen, seed=seed, eval_data=eval_data,
                         eval_seqlen=eval_seqlen, limit=limit, device=device, overwrite=overwrite,
                         progress=not as_json)
    if as_json:
        echo_json(result)
        return
    fp = result["fp"]
    rows = [("fp", "-", f"{fp['ppl']:.4f}", "-", "-")]
    rows += [(repr(r["alpha"]), r["dir"], f"{r['ppl']:.4f}", f"{r['delta_ppl']:+.4f}",
              "-" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}%") for r in result["results"]]
    echo_table(["alpha", "checkpoint", "ppl", "Δ vs fp", "Δ%"], rows)
    click.echo(f"{', '.join(result['scales'])} swept; ppl on {fp['data_file']} ({fp['n_windows']} windows x "
               f"{fp['seqlen']}); wrote {output}/sweep.json, {output}/sweep.png")
