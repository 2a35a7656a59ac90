"""Train a fixture language model (Mamba1 or Mamba2) with ssmq's own model code, deterministically.

    python tools/train_fixture.py --arch mamba1 --data ../shared/data \
        --tokenizer build/fixture-tokenizer.json --steps 400 --seed 0 --out build/tiny-mamba1

Writes OUT/config.json, OUT/model.safetensors (fp16), OUT/tokenizer.json and OUT/training_log.json
(arguments, data provenance, the learning curve on a held-out split of the training text, timings).
The corpus is tools/fixture_corpus.py's; the schedule is AdamW with linear warm-up and cosine decay.
By default the weights saved are those of the evaluation with the lowest held-out loss (`--keep best`).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import ssmq  # noqa: E402
from fixture_corpus import load_corpus  # noqa: E402
from ssmq.models.checkpoint import state_dict_sha256  # noqa: E402
from ssmq.models.tokenizer import EOS_TOKEN  # noqa: E402
from train_scan import use_train_scan  # noqa: E402

SHAPES = {
    "mamba1": dict(arch="mamba1", d_model=256, n_layer=8, vocab_size=4096, d_state=16, expand=2),
    "mamba2": dict(arch="mamba2", d_model=256, n_layer=8, vocab_size=4096, d_state=64, expand=2, headdim=32,
                   ngroups=2, chunk_size=64),
}
NO_DECAY = (".A_log", ".D", ".dt_bias")


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents' ids, each followed by `<|endoftext|>` (id 0), as one int64 tensor."""
    eos = tok.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.int64)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up to --lr, then cosine decay to --lr * --min-lr-ratio at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; weight decay on weights of 2+ dimensions except A_log (not on norms, biases, D, dt_bias)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.dim() < 2 or name.endswith(NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over windows (batch, seqlen + 1)."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, stream: torch.Tensor, seqlen: int, batch: int) -> float:
    """Mean NLL over non-overlapping windows of the held-out stream."""
    n = (stream.numel() - 1) // seqlen
    windows = torch.stack([stream[i * seqlen:(i + 1) * seqlen + 1] for i in range(n)])
    total = 0.0
    for start in range(0, n, batch):
        chunk = windows[start:start + batch]
        total += float(lm_loss(model, chunk)) * chunk.shape[0]
    return total / n


def train(args: argparse.Namespace) -> tuple[ssmq.MambaLM, dict]:
    """Train; returns the fp32 model and the log (learning curve, timings, data provenance)."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device)

    tok = Tokenizer.from_file(str(args.tokenizer))
    corpus = load_corpus(args.data)
    train_ids = token_stream(tok, corpus.train).to(device)
    valid_ids = token_stream(tok, corpus.valid).to(device)

    cfg = ssmq.MambaConfig(**SHAPES[args.arch])
    model = ssmq.build_model(cfg, seed=args.seed, device=device).train()
    if args.arch == "mamba1" and args.scan == "train":
        use_train_scan(model)
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seqlen + 1, device=device)

    log: dict = {"curve": [], "train_loss": []}
    best = (math.inf, 0, None)  # held-out loss, step, weights
    t0 = time.perf_counter()
    pending: list[torch.Tensor] = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            val = held_out_loss(model, valid_ids, args.seqlen, args.batch)
            model.train()
            recent = [float(x) for x in pending]
            log["train_loss"] += [round(x, 4) for x in recent]
            pending = []
            point = {"step": step, "tokens": step * args.batch * args.seqlen, "seconds": round(time.perf_counter() - t0, 1),
                     "lr": lr_at(min(step, args.steps - 1), args), "valid_loss": round(val, 4),
                     "valid_ppl": round(math.exp(val), 2),
                     "train_loss": round(sum(recent) / len(recent), 4) if recent else None}
            log["curve"].append(point)
            print(json.dumps(point), flush=True)
            if args.keep == "best" and val < best[0]:
                best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if step == args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch,), generator=gen).to(device)
        loss = lm_loss(model, train_ids[starts[:, None] + offsets])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        pending.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    log["train_seconds"] = round(time.perf_counter() - t0, 1)
    if args.keep == "best":
        model.load_state_dict(best[2])
    log["kept"] = {"rule": args.keep, "step": best[1] if args.keep == "best" else args.steps,
                   "valid_loss": round(best[0] if args.keep == "best" else log["curve"][-1]["valid_loss"], 4)}
    log["data"] = {"files_sha256": corpus.files, "documents": corpus.counts,
                   "train_tokens": train_ids.numel(), "valid_tokens": valid_ids.numel()}
    return model, log


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(SHAPES), required=True)
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data directory")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer JSON (tools/train_tokenizer.py)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="weights to save: those of the lowest held-out loss seen, or the last step's")
    p.add_argument("--scan", choices=("train", "reference"), default="train",
                   help="Mamba1 scan used for training: tools/train_scan.py's or ssmq's reference")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on the GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    model, log = train(args)
    half = copy.deepcopy(model).half().eval()
    ssmq.save(half, args.out, tokenizer=args.tokenizer)
    log.update(
        arch=args.arch, config=half.config.to_transformers(),
        parameters=sum(p.numel() for p in half.parameters()),
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        tokenizer_sha256=hashlib.sha256(args.tokenizer.read_bytes()).hexdigest(),
        weights_sha256=state_dict_sha256(half), environment=environment(torch.device(args.device)),
    )
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    kept = log["kept"]
    print(f"saved {args.out}: {args.steps} steps in {log['train_seconds']} s, kept step {kept['step']} "
          f"(held-out loss {kept['valid_loss']}, ppl {math.exp(kept['valid_loss']):.2f}), "
          f"weights {log['weights_sha256'][:16]}")


if __name__ == "__main__":
    main()
