"""Perplexity on a data file, in the Quamba/GPTQ convention.

The evaluation text is one string: for WikiText-2 raw test, the rows of the Hugging Face
`wikitext-2-raw-v1` test split (each line of the file with its newline; whitespace-only lines
become empty rows) joined with "\\n\\n"; for a JSONL file, the selected documents' `text` joined
with "\\n\\n". It is tokenized once and cut into non-overlapping windows of `seqlen` tokens (the
last partial window is dropped). Each window is scored alone, from an empty state: its first
token is context, the other `seqlen - 1` are predicted. ppl = exp(mean NLL of predicted tokens).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from ssmq.data import file_sha256, is_jsonl, read_jsonl_texts, shared_data_dir
from ssmq.errors import SsmqError
from ssmq.models.device import parse_device
from ssmq.models.lm import MambaLM

log = logging.getLogger(__name__)

WIKITEXT_TEST = "wikitext-2-raw-test.txt"


def default_data_path() -> Path:
    """WikiText-2 raw test in the project's shared data directory."""
    return shared_data_dir() / WIKITEXT_TEST


def wikitext_rows(path: Path) -> list[str]:
    """The file's lines as the Hugging Face wikitext loader yields them (blank lines become "")."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def jsonl_texts(path: Path, docs: Sequence[int] | None) -> tuple[list[str], list[int]]:
    """The `text` of the selected documents (all when docs is None) and their indices."""
    texts = read_jsonl_texts(path)
    chosen = list(range(len(texts))) if docs is None else list(docs)
    bad = [i for i in chosen if not 0 <= i < len(texts)]
    if bad:
        raise SsmqError(f"{path}: document {bad[0]} out of range (the file has {len(texts)} documents)")
    return [texts[i] for i in chosen], chosen


def format_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def parse_ranges(spec: str) -> list[int]:
    """'0-63' or '0-9,20' -> document indices (ranges are inclusive)."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            first, last = 0, -1
        if last < first or first < 0:
            raise SsmqError(f"bad document range {part.strip()!r} in {spec!r}; use e.g. 0-63 or 0-9,20")
        out += range(first, last + 1)
    return out


def eval_text(path: Path, docs: Sequence[int] | None = None) -> tuple[str, str]:
    """The evaluation string of a data file and a description of the documents used."""
    path = Path(path)
    if not path.is_file():
        raise SsmqError(f"{path}: data file not found")
    if is_jsonl(path):
        texts, chosen = jsonl_texts(path, docs)
        return "\n\n".join(texts), format_ranges(chosen)
    if docs is not None:
        raise SsmqError(f"{path}: document selection applies to JSONL files only")
    rows = wikitext_rows(path)
    return "\n\n".join(rows), f"all {len(rows)} lines"


def _check(seqlen: int, limit: int | None, batch_size: int) -> None:
    if seqlen < 2:
        raise SsmqError(f"seqlen must be >= 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise SsmqError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise SsmqError(f"batch size must be >= 1, got {batch_size}")


@torch.no_grad()
def evaluate_ppl(model: MambaLM, tokenizer: Tokenizer, data_path: str | Path | None = None, seqlen: int = 2048,
                 limit: int | None = None, device: str | torch.device | None = None,
                 docs: Sequence[int] | None = None, batch_size: int = 1, progress: bool = False) -> dict[str, Any]:
    """Perplexity of `model` on a data file (default: WikiText-2 raw test), with the data's provenance.

    limit: score at most this many windows; docs: JSONL document indices (default all);
    device: where to run, the model is moved there (default: where it is); batch_size: windows per forward."""
    _check(seqlen, limit, batch_size)
    if tokenizer is None:
        raise SsmqError("perplexity needs a tokenizer: pass --tokenizer PATH")
    path = Path(data_path) if data_path is not None else default_data_path()
    text, documents = eval_text(path, docs)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise SsmqError(f"{path.name}: {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n_windows = min(n_windows, limit)
    run_device = parse_device(device) if device is not None else model.device
    model = model.to(run_device)
    windows = ids[:n_windows * seqlen].view(n_windows, seqlen)
    total_nll = 0.0
    starts = range(0, n_windows, batch_size)
    for start in tqdm(starts, desc=f"ppl {path.name}", unit="batch", disable=not progress):
        batch = windows[start:start + batch_size].to(run_device)
        logits = model(batch)[:, :-1].float()
        total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                           reduction="sum"))
    n_scored = n_windows * (seqlen - 1)
    nll = total_nll / n_scored
    log.info("ppl %.4f on %s (%d windows of %d)", math.exp(nll), path.name, n_windows, seqlen)
    return {
        "ppl": math.exp(nll), "nll": nll, "n_tokens": n_scored, "n_windows": n_windows, "seqlen": seqlen,
        "data_tokens": ids.numel(), "data_file": path.name,
        "data_sha256": file_sha256(path), "documents": documents,
        "dtype": str(model.dtype).removeprefix("torch."), "device": str(run_device),
    }
