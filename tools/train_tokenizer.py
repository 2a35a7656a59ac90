"""Train the fixture models' tokenizer: byte-level BPE on the training split of the fixture corpus.

    python tools/train_tokenizer.py --data ../shared/data --vocab 4096 --out build/fixture-tokenizer.json

`<|endoftext|>` is id 0 (the document separator). Training is deterministic: the same text and
vocabulary size give the same file.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fixture_corpus import load_corpus

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with `vocab_size` ids, `<|endoftext|>` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data directory")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size, special token included")
    parser.add_argument("--out", type=Path, required=True, help="tokenizer JSON to write")
    args = parser.parse_args()
    corpus = load_corpus(args.data)
    tok = train_tokenizer(corpus.train, args.vocab)
    assert tok.token_to_id(EOS) == 0, "the end-of-text token must be id 0"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out))
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(corpus.train))
    chars = sum(len(t) for t in corpus.train)
    print(f"wrote {args.out} ({tok.get_vocab_size()} ids, sha256 {digest[:16]}); "
          f"training split: {n_tokens} tokens, {chars / n_tokens:.2f} chars/token")


if __name__ == "__main__":
    main()
