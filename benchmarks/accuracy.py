"""Perplexity of an fp model and of each quantization recipe applied to it, in one table.

    python benchmarks/accuracy.py tiny-mamba1 --recipes quamba1,minmax-static,dynamic --json out.json

Calibration: the default data (Pile validation documents 0-255, --n of them, --seqlen tokens);
evaluation: WikiText-2 raw test (the Quamba/GPTQ convention). The two never overlap.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import ssmq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--recipes", default="quamba1,minmax-static,dynamic")
    parser.add_argument("--n", type=int, default=None, help="calibration documents (default: all 256)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration tokens per document")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="evaluation windows (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration documents and eval windows per forward")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    fp, tok = ssmq.load(args.model, device=args.device, dtype="fp32")
    rows = []
    start = time.perf_counter()
    base = ssmq.evaluate_ppl(fp, tok, seqlen=args.eval_seqlen, limit=args.limit, device=args.device,
                             batch_size=args.batch_size)
    rows.append({"model": "fp32", "ppl": base["ppl"], "seconds": time.perf_counter() - start})
    print(f"fp32: ppl {base['ppl']:.3f}", flush=True)
    for recipe in args.recipes.split(","):
        start = time.perf_counter()
        qm = ssmq.quantize(args.model, recipe, n=args.n, seqlen=args.seqlen, device=args.device,
                           batch_size=args.batch_size)
        result = ssmq.evaluate_ppl(qm.to(args.device), tok, seqlen=args.eval_seqlen, limit=args.limit,
                                   device=args.device, batch_size=args.batch_size)
        rows.append({"model": recipe, "ppl": result["ppl"], "seconds": time.perf_counter() - start})
        print(f"{recipe}: ppl {result['ppl']:.3f}", flush=True)
    for row in rows:
        row["delta_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
    print(f"{'model':16s} {'ppl':>10s} {'vs fp':>8s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['model']:16s} {row['ppl']:10.3f} {row['delta_pct']:+7.2f}% {row['seconds']:8.1f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"model": args.model, "eval": {k: base[k] for k in base if k != "ppl"}, "calibration_n": args.n,
                       "calibration_seqlen": args.seqlen, "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
