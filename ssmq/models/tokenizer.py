"""Tokenizer loading (a `tokenizers` JSON file) and its fit with a model's embedding."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from ssmq.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizers JSON file; a clear error when it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise CheckpointError(f"{path}: unreadable tokenizer ({exc})") from None


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    """Every token id must index a row of the embedding."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise CheckpointError(f"{source}: tokenizer has {n} ids but the model's embedding has only "
                              f"{vocab_size} rows")


def find_tokenizer(model_dir: Path, explicit: Path | None) -> Path | None:
    """The tokenizer to use: an explicit path, else tokenizer.json in the model directory, else None."""
    if explicit is not None:
        return Path(explicit)
    candidate = Path(model_dir) / TOKENIZER_FILE
    return candidate if candidate.is_file() else None
