"""Calibration text: reading JSONL or plain text, choosing documents deterministically, tokenizing.

JSONL files (`.jsonl` / `.json`, one `{"text": ...}` object per line) are read as documents; empty
texts are not eligible. Any other file is plain text: it is tokenized as a whole and cut into
non-overlapping windows of `seqlen` tokens, and the windows are the documents.

n documents are chosen with a seeded permutation (all of them, in file order, when n equals the
number available) and used in file order; each is truncated to its first `seqlen` tokens.
Without a data file, the default is documents 0-255 of the shared `pile-val-512.jsonl` (the Pile
validation documents reserved for calibration; see ../shared/data/README.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

import ssmq
from ssmq.errors import SsmqError

DEFAULT_DATA_FILE = "pile-val-512.jsonl"
DEFAULT_DOCUMENTS = 256  # documents 0-255: calibration only
DEFAULT_MAX_DOCUMENTS = 512


def shared_data_dir() -> Path:
    """The project's shared data directory, `../shared/data` relative to the project root."""
    return Path(ssmq.__file__).resolve().parents[2] / "shared" / "data"


def default_data_path() -> Path:
    return shared_data_dir() / DEFAULT_DATA_FILE


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """Identity of a tokenizer: the hash of its canonical JSON serialization."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _unpadded(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without padding or truncation (either would change the token ids silently)."""
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def is_jsonl(path: Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def read_jsonl_texts(path: Path) -> list[str]:
    """The `text` field of every non-blank line; errors name the line."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SsmqError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SsmqError(f"{path}:{lineno}: expected an object with a string 'text' field")
            texts.append(record["text"])
    return texts


@dataclass
class CalibrationData:
    """Token ids of the chosen documents, and where they came from."""

    source: str
    sha256: str | None
    kind: str                 # 'jsonl-documents', 'text-windows' or 'token-ids'
    indices: list[int]        # document (or window) index in the source, one per chosen document
    token_ids: list[list[int]]
    seqlen: int
    seed: int

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise SsmqError(f"{self.source}: no calibration documents")
        for i, ids in zip(self.indices, self.token_ids):
            if not ids:
                raise SsmqError(f"{self.source}: document {i} has no tokens")

    @classmethod
    def from_token_ids(cls, token_ids: list[list[int]], source: str = "<token ids>") -> CalibrationData:
        """Data given directly as token ids (tests, benchmarks); used as is."""
        return cls(source, None, "token-ids", list(range(len(token_ids))), [list(t) for t in token_ids],
                   max((len(t) for t in token_ids), default=0), 0)

    @property
    def n(self) -> int:
        return len(self.token_ids)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def describe(self, position: int) -> str:
        """How errors name the document at `position` of the chosen list."""
        unit = "window" if self.kind == "text-windows" else "document"
        return f"{unit} {self.indices[position]} of {self.source}"

    def provenance(self) -> dict[str, Any]:
        return {"file": self.source, "sha256": self.sha256, "kind": self.kind, "indices": self.indices,
                "n": self.n, "seqlen": self.seqlen, "seed": self.seed, "tokens": self.tokens}


def choose(available: int, n: int | None, seed: int, source: str) -> list[int]:
    """n of range(available), in increasing order: all when n equals available, else a seeded choice."""
    if available == 0:
        raise SsmqError(f"{source}: no documents (empty data)")
    n = min(DEFAULT_MAX_DOCUMENTS, available) if n is None else n
    if n < 1:
        raise SsmqError(f"n must be >= 1, got {n}")
    if n > available:
        raise SsmqError(f"{source}: too short: {available} documents available, n={n} requested")
    if n == available:
        return list(range(available))
    perm = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:n].tolist())


def load_calibration_data(tokenizer: Tokenizer, path: str | Path | None = None, n: int | None = None,
                          seqlen: int = 512, seed: int = 0) -> CalibrationData:
    """Read, choose and tokenize calibration documents (see the module docstring)."""
    if seqlen < 1:
        raise SsmqError(f"seqlen must be >= 1, got {seqlen}")
    file = default_data_path() if path is None else Path(path)
    if not file.is_file():
        raise SsmqError(f"{file}: calibration data file not found")
    source, digest = str(file), file_sha256(file)
    tokenizer = _unpadded(tokenizer)
    if is_jsonl(file):
        texts = read_jsonl_texts(file)
        if path is None:
            texts = texts[:DEFAULT_DOCUMENTS]
        eligible = [i for i, t in enumerate(texts) if t]
        chosen = [eligible[i] for i in choose(len(eligible), n, seed, source)]
        ids = [e.ids[:seqlen] for e in tokenizer.encode_batch([texts[i] for i in chosen])]
        return CalibrationData(source, digest, "jsonl-documents", chosen, ids, seqlen, seed)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SsmqError(f"{file}: not UTF-8 text ({exc.reason})") from None
    stream = tokenizer.encode(text).ids if text else []
    windows = len(stream) // seqlen
    if text and windows == 0:
        raise SsmqError(f"{file}: too short: {len(stream)} tokens, fewer than seqlen={seqlen}")
    chosen = choose(windows, n, seed, source)
    ids = [stream[w * seqlen:(w + 1) * seqlen] for w in chosen]
    return CalibrationData(source, digest, "text-windows", chosen, ids, seqlen, seed)
