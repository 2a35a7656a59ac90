"""The training text of the fixture models, read from the shared data directory and split into documents.

Only the files the data README allows for training are read: WikiText-2 validation tokens, Tiny
Shakespeare, ARC train questions and Pile validation documents 256-511. WikiText-2 test and Pile
documents 0-255 are never touched. Every `HOLDOUT_EVERY`-th document of each source is held out
as the validation split that draws the learning curve.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

WIKITEXT_VALID = "wikitext-2-valid.tokens.txt"
SHAKESPEARE = "tinyshakespeare.txt"
ARC_TRAIN = ("arc-easy-train.jsonl", "arc-challenge-train.jsonl")
PILE = "pile-val-512.jsonl"
PILE_TRAIN_DOCS = range(256, 512)
SOURCE_FILES = (WIKITEXT_VALID, SHAKESPEARE, *ARC_TRAIN, PILE)
HOLDOUT_EVERY = 20
SHAKESPEARE_PIECE_CHARS = 8000
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass
class Corpus:
    """Training and held-out documents, with the provenance of every file read."""

    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> train/valid documents


def wikitext_articles(text: str) -> list[str]:
    """Split the WikiText token file at its top-level article titles (' = Title = ')."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _ARTICLE_TITLE.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


def text_pieces(text: str, min_chars: int) -> list[str]:
    """Contiguous pieces of at least `min_chars` characters, cut at blank lines."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        current += para + "\n\n"
        if len(current) >= min_chars:
            pieces.append(current)
            current = ""
    if current.strip():
        pieces.append(current)
    return pieces


def arc_document(row: dict) -> str:
    """One ARC question as text: the question, its lettered choices and the answer."""
    choices = dict(zip(row["choices"]["label"], row["choices"]["text"]))
    lines = [f"Question: {row['question']}"] + [f"{label}. {text}" for label, text in choices.items()]
    answer = row["answerKey"]
    lines.append(f"Answer: {answer}. {choices.get(answer, '')}".rstrip())
    return "\n".join(lines) + "\n"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_corpus(data_dir: Path) -> Corpus:
    """Read the training sources in a fixed order and split each into train and held-out documents."""
    data_dir = Path(data_dir)
    pile = _read_jsonl(data_dir / PILE)
    sources: dict[str, list[str]] = {
        "wikitext-2-valid": wikitext_articles((data_dir / WIKITEXT_VALID).read_text(encoding="utf-8")),
        "tinyshakespeare": text_pieces((data_dir / SHAKESPEARE).read_text(encoding="utf-8"), SHAKESPEARE_PIECE_CHARS),
        "arc-train": [arc_document(row) for name in ARC_TRAIN for row in _read_jsonl(data_dir / name)],
        "pile-val-256-511": [pile[i]["text"] for i in PILE_TRAIN_DOCS],
    }
    corpus = Corpus(files={name: _sha256(data_dir / name) for name in SOURCE_FILES})
    for source, docs in sources.items():
        held = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2]
        kept = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY != HOLDOUT_EVERY // 2]
        corpus.train += kept
        corpus.valid += held
        corpus.counts[source] = {"train": len(kept), "valid": len(held)}
    return corpus
