"""Perplexity: the WikiText/JSONL joining convention, the windowing, and the `ssmq eval ppl` command."""

import hashlib
import json
import math

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import ssmq
from ssmq.cli.main import cli
from ssmq.errors import SsmqError
from ssmq.eval.perplexity import eval_text, evaluate_ppl, format_ranges, parse_ranges

from conftest import SHARED_DATA, tiny_config

WIKI_LINES = [" \n", " = Robert Boulter = \n", " \n", " Robert Boulter is an English film , television and theatre actor .\n",
              " He had a guest @-@ starring role on the television series The Bill in 2000 .\n", " \n",
              " = = Career = = \n", " \n", " In 2006 , Boulter starred alongside Whishaw in the play Citizenship .\n"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE (about 300 ids) trained on the test text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(WIKI_LINES, trainer=trainer)
    return tok


@pytest.fixture
def wiki_file(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("".join(WIKI_LINES * 3), encoding="utf-8")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} says hello"}) + "\n" for i in range(5)))
    return path


def model_for(arch: str, tokenizer: Tokenizer) -> ssmq.MambaLM:
    return ssmq.build_model(tiny_config(arch, vocab_size=tokenizer.get_vocab_size()), seed=5)


@torch.no_grad()
def reference_ppl(model: ssmq.MambaLM, ids: list[int], seqlen: int) -> float:
    """Windows scored one at a time, each token's NLL taken from a float64 log-softmax."""
    nll, count = 0.0, 0
    for w in range(len(ids) // seqlen):
        window = ids[w * seqlen:(w + 1) * seqlen]
        logp = torch.log_softmax(model(torch.tensor([window]))[0].double(), dim=-1)
        for pos in range(seqlen - 1):
            nll -= float(logp[pos, window[pos + 1]])
            count += 1
    return math.exp(nll / count)


def test_wikitext_rows_keep_newlines_blank_lines_become_empty(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text(" \n = A = \n \n b c\n", encoding="utf-8")
    text, documents = eval_text(path)
    assert text == "\n\n = A = \n\n\n\n\n b c\n"  # rows "", " = A = \n", "", " b c\n" joined by "\n\n"
    assert documents == "all 4 lines"


def test_jsonl_selected_documents_joined(jsonl_file):
    text, documents = eval_text(jsonl_file, docs=[1, 3, 4])
    assert text == "document number 1 says hello\n\ndocument number 3 says hello\n\ndocument number 4 says hello"
    assert documents == "1,3-4"
    assert eval_text(jsonl_file)[1] == "0-4"
    with pytest.raises(SsmqError, match="document 7 out of range"):
        eval_text(jsonl_file, docs=[0, 7])


def test_document_ranges():
    assert parse_ranges("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert format_ranges(parse_ranges("0-63")) == "0-63"
    for bad in ("3-1", "x", "", "-2"):
        with pytest.raises(SsmqError, match="bad document range"):
            parse_ranges(bad)


def test_ppl_matches_independent_computation(arch, tokenizer, wiki_file):
    model = model_for(arch, tokenizer)
    seqlen = 16
    ids = tokenizer.encode(eval_text(wiki_file)[0]).ids
    result = evaluate_ppl(model, tokenizer, wiki_file, seqlen=seqlen)
    assert result["n_windows"] == len(ids) // seqlen >= 3
    assert result["n_tokens"] == result["n_windows"] * (seqlen - 1)
    assert result["data_tokens"] == len(ids)
    assert result["ppl"] == pytest.approx(reference_ppl(model, ids, seqlen), rel=1e-5)
    assert result["data_file"] == "wiki.txt"
    assert result["data_sha256"] == hashlib.sha256(wiki_file.read_bytes()).hexdigest()
    batched = evaluate_ppl(model, tokenizer, wiki_file, seqlen=seqlen, batch_size=3)
    assert batched["ppl"] == pytest.approx(result["ppl"], rel=1e-5)


def test_limit_and_jsonl_docs(tokenizer, jsonl_file):
    model = model_for("mamba1", tokenizer)
    full = evaluate_ppl(model, tokenizer, jsonl_file, seqlen=8, docs=[0, 2])
    ids = tokenizer.encode("document number 0 says hello\n\ndocument number 2 says hello").ids
    assert full["ppl"] == pytest.approx(reference_ppl(model, ids, 8), rel=1e-5)
    assert full["documents"] == "0,2"
    one = evaluate_ppl(model, tokenizer, jsonl_file, seqlen=8, docs=[0, 2], limit=1)
    assert one["n_windows"] == 1
    assert one["ppl"] == pytest.approx(reference_ppl(model, ids[:8], 8), rel=1e-5)


def test_errors(tokenizer, wiki_file):
    model = model_for("mamba1", tokenizer)
    with pytest.raises(SsmqError, match="fewer than one window"):
        evaluate_ppl(model, tokenizer, wiki_file, seqlen=100_000)
    with pytest.raises(SsmqError, match="JSONL files only"):
        evaluate_ppl(model, tokenizer, wiki_file, docs=[0])
    with pytest.raises(SsmqError, match="seqlen"):
        evaluate_ppl(model, tokenizer, wiki_file, seqlen=1)
    with pytest.raises(SsmqError, match="not found"):
        evaluate_ppl(model, tokenizer, wiki_file.with_name("missing.txt"))


def test_cli_eval_ppl_json(tmp_path, tokenizer, wiki_file):
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(tok_path))
    model = model_for("mamba2", tokenizer)
    directory = ssmq.save(model, tmp_path / "m", tokenizer=tok_path)
    result = CliRunner().invoke(cli, ["eval", "ppl", str(directory), "--data", str(wiki_file), "--seqlen", "16",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ppl"] == pytest.approx(evaluate_ppl(model, tokenizer, wiki_file, seqlen=16)["ppl"], rel=1e-5)
    assert data["model"] == str(directory) and data["seqlen"] == 16
    text = CliRunner().invoke(cli, ["eval", "ppl", str(directory), "--data", str(wiki_file), "--seqlen", "16",
                                    "--docs", "0-1", "--device", "cpu"])
    assert text.exit_code == 2 and "JSONL files only" in text.output


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw-test.txt").is_file(), reason="shared data not present")
@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2"])
def test_builtin_fixtures_are_trained(name):
    model, tok = ssmq.load(name, dtype="fp32")
    assert model.config.vocab_size == tok.get_vocab_size() == 4096
    assert (model.config.d_model, model.config.n_layer) == (256, 8)
    result = evaluate_ppl(model, tok, SHARED_DATA / "wikitext-2-raw-test.txt", seqlen=256, limit=2)
    assert result["ppl"] < 400  # an untrained model of this vocabulary scores about 4096
