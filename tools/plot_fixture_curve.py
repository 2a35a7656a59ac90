"""Draw a fixture model's learning curve from its training log.

    python tools/plot_fixture_curve.py ssmq/fixtures/tiny-mamba1/training_log.json ssmq/fixtures/tiny-mamba1/learning_curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="training_log.json written by tools/train_fixture.py")
    parser.add_argument("png", type=Path, help="image to write")
    args = parser.parse_args()
    log = json.loads(args.log.read_text())
    steps = range(1, len(log["train_loss"]) + 1)
    curve = log["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    ax.plot(steps, log["train_loss"], lw=0.6, alpha=0.6, label="training batch loss")
    ax.plot([p["step"] for p in curve], [p["valid_loss"] for p in curve], "o-", ms=3, label="held-out loss")
    ax.axvline(log["kept"]["step"], color="grey", ls=":", lw=1, label=f"kept: step {log['kept']['step']}")
    ax.set(xlabel="step", ylabel="next-token NLL (nats)", ylim=(2.5, 8.5),
           title=f"{log['arch']}: {log['parameters'] / 1e6:.2f}M parameters, seed {log['args']['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png)
    print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
