"""Percentile sweeps: calibrate once, then one quantized checkpoint per α and its perplexity.

The statistics are collected once on the recipe-transformed model, with every swept α in their
quantile grid, so each checkpoint's percentile scales are derived exactly from them (no model run
per α). Each α gets the directory `alpha-<repr(α)>` (`alpha-0.999999` and `alpha-1.0` never
collide); the sweep directory also holds the statistics (`stats/`, reusable by `ssmq scales
derive`), `sweep.json` and `sweep.png`, and is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssmq.api import load
from ssmq.errors import SsmqError
from ssmq.eval.perplexity import evaluate_ppl
from ssmq.models.checkpoint import atomic_directory
from ssmq.models.registry import resolve_model_dir
from ssmq.models.taps import match_taps
from ssmq.models.tokenizer import find_tokenizer
from ssmq.quant.calibrate import check_output
from ssmq.quant.observers import check_alpha_sigma
from ssmq.quant.plan import build_plan, scale_names
from ssmq.quant.qmodel import save_quantized
from ssmq.quant.quantize import calibrate_for_recipe, quantize
from ssmq.quant.recipes import get_recipe

log = logging.getLogger(__name__)

METRICS = ("ppl",)


def alpha_dir(alpha: float) -> str:
    """The checkpoint directory name of one α: its exact repr, so distinct values never collide."""
    return f"alpha-{alpha!r}"


def parse_alphas(alphas: str | Sequence[float]) -> list[float]:
    """'0.999,0.9999,1.0' (or numbers) -> checked floats in (0, 1], each once."""
    items = alphas.split(",") if isinstance(alphas, str) else list(alphas)
    out: list[float] = []
    for item in items:
        try:
            alpha = float(item)
        except ValueError:
            raise SsmqError(f"alpha {str(item).strip()!r} is not a number") from None
        check_alpha_sigma(alpha, 0.01)
        if alpha in out:
            raise SsmqError(f"alpha {alpha!r} is given twice")
        out.append(alpha)
    if not out:
        raise SsmqError("give at least one alpha")
    return out


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Perplexity per α, with the fp perplexity as a reference line."""
    from matplotlib.figure import Figure  # imported here: only plotting needs matplotlib

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    rows = result["results"]
    ax.plot(range(len(rows)), [r["ppl"] for r in rows], marker="o", label=f"{result['recipe']} W8A8")
    ax.axhline(result["fp"]["ppl"], color="gray", linestyle="--", label="fp")
    ax.set_xticks(range(len(rows)), [repr(r["alpha"]) for r in rows])
    ax.set_xlabel(f"percentile α of {', '.join(result['scales'])}")
    ax.set_ylabel(f"perplexity ({result['fp']['data_file']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png", dpi=100)
    return path


def sweep_alpha(model: str | Path, alphas: str | Sequence[float], output: str | Path, *, recipe: str = "quamba1",
                scales: Sequence[str] | None = None, metric: str = "ppl", tokenizer: str | Path | None = None,
                data: str | Path | None = None, n: int | None = None, seqlen: int = 512, seed: int = 0,
                eval_data: str | Path | None = None, eval_seqlen: int = 2048, limit: int | None = None,
                device: str | torch.device = "cpu", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Calibrate `model` once for `recipe`, write one checkpoint per α with the percentile scales
    matching `scales` (default: the recipe's percentile taps) at that α, and evaluate the perplexity
    of each and of the fp model (`metric`: 'ppl'). Returns the table, also written to `output`/sweep.json."""
    if metric not in METRICS:
        raise SsmqError(f"unknown evaluation {metric!r}; available: {', '.join(METRICS)}")
    values = parse_alphas(alphas)
    r = get_recipe(recipe)
    if r.activations != "static":
        raise SsmqError(f"recipe {recipe!r} computes its scales at run time; there is no α to sweep")
    patterns = list(scales) if scales else list(r.percentile_taps)
    if not patterns:
        raise SsmqError(f"recipe {recipe!r} has no percentile scales; name the scales to sweep")
    source_dir = resolve_model_dir(model)
    if Path(output).resolve() == source_dir.resolve():
        raise SsmqError(f"{output}: the output directory is the source model; choose another")
    check_output(output, overwrite)
    fp, tok = load(source_dir, tokenizer=tokenizer)
    if tok is None:
        raise SsmqError(f"{model}: no tokenizer (the model has no tokenizer.json); pass one with --tokenizer")
    if not scales:  # the recipe's percentile taps, named for this architecture
        patterns = list(r.percentile_patterns(fp.config.arch))
    names = scale_names(build_plan(fp.config, r, False, False))
    for pattern in patterns:
        match_taps(pattern, names)  # a pattern matching no scale fails here, before any work
    tok_file = find_tokenizer(source_dir, Path(tokenizer) if tokenizer else None)
    stats = calibrate_for_recipe(source_dir, r, tokenizer=tok, data=data, n=n, seqlen=seqlen, seed=seed,
                                 device=device, progress=progress, extra_alphas=values)
    ppl = dict(data_path=eval_data, seqlen=eval_seqlen, limit=limit, device=device, progress=progress)
    fp_result = evaluate_ppl(fp, tok, **ppl)
    del fp
    results = []
    with atomic_directory(Path(output), overwrite) as tmp:
        stats.save(tmp / "stats")
        for alpha in values:
            rules = [f"{p}=percentile(alpha={alpha!r})" for p in patterns]
            qm = quantize(source_dir, recipe, tokenizer=tok, stats=stats, rules=rules, progress=progress)
            save_quantized(qm, tmp / alpha_dir(alpha), tok_file)
            res = evaluate_ppl(qm, tok, **ppl)
            log.info("alpha %r: ppl %.4f (fp %.4f)", alpha, res["ppl"], fp_result["ppl"])
            finite = math.isfinite(res["ppl"])
            results.append({"alpha": alpha, "dir": alpha_dir(alpha), "ppl": res["ppl"], "nll": res["nll"],
                            "delta_ppl": res["ppl"] - fp_result["ppl"],
                            "delta_pct": 100 * (res["ppl"] / fp_result["ppl"] - 1) if finite else None})
        result = {"model": str(model), "recipe": recipe, "scales": patterns, "metric": metric, "output": str(output),
                  "fp": fp_result, "results": results, "calibration": stats.provenance}
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_sweep(result, tmp / "sweep.png")
    return result
