"""`ssmq info` and `ssmq generate` through the CLI, and generation through the Python API."""

import json

import pytest
import torch
from click.testing import CliRunner

import ssmq
from ssmq.cli.main import cli
from ssmq.errors import SsmqError

from conftest import NEOX_TOKENIZER


@pytest.fixture
def neox_model_dir(tmp_path, arch):
    """A tiny random model whose embedding fits the GPT-NeoX tokenizer, saved with it."""
    cfg = ssmq.MambaConfig(arch=arch, d_model=32, n_layer=2, vocab_size=50280, d_state=8, headdim=8, ngroups=2,
                           chunk_size=8)
    return ssmq.save(ssmq.build_model(cfg, seed=2), tmp_path / arch, tokenizer=NEOX_TOKENIZER)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_text_and_json(neox_model_dir, arch):
    result = run("info", neox_model_dir)
    assert result.exit_code == 0, result.output
    assert f"arch        {arch} (fp)" in result.output
    data = json.loads(run("info", neox_model_dir, "--json").output)
    model, _ = ssmq.load(neox_model_dir)
    assert data["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert data["tokenizer"]["vocab_size"] == 50277
    assert data["dtypes"] == {"float32": data["parameters"]["total"]}


def test_generate_streams_the_same_text_as_the_api(neox_model_dir):
    result = run("generate", neox_model_dir, "--prompt", "The meaning of", "--max-new-tokens", "12", "--device", "cpu")
    assert result.exit_code == 0, result.output
    model, tok = ssmq.load(neox_model_dir)
    pieces = []
    g = ssmq.generate(model, tok, "The meaning of", 12, on_text=pieces.append)
    assert "".join(pieces) == g.text
    assert result.output.startswith("The meaning of" + g.text)
    assert len(g.new_ids) == 12


@torch.no_grad()
def test_greedy_is_argmax_of_full_forward(neox_model_dir):
    model, tok = ssmq.load(neox_model_dir)
    g = ssmq.generate(model, tok, "Hello", 6, stop_at_eos=False)
    ids = torch.tensor([g.prompt_ids])
    for token in g.new_ids:  # recompute each step from scratch, without a cache
        assert int(model(ids)[0, -1].argmax()) == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_sampling_is_reproducible_and_validated(neox_model_dir):
    model, tok = ssmq.load(neox_model_dir)
    a = ssmq.generate(model, tok, "Hi", 8, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    b = ssmq.generate(model, tok, "Hi", 8, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    assert a.new_ids == b.new_ids
    with pytest.raises(SsmqError, match="top_p"):
        ssmq.generate(model, tok, "Hi", 8, top_p=0.0)


def test_user_errors_exit_2_with_one_line(tmp_path, neox_model_dir):
    result = run("info", tmp_path / "nope")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: no such directory, and not a built-in model (built-in: tiny-mamba1, tiny-mamba2)"]
    (neox_model_dir / "tokenizer.json").unlink()
    result = run("generate", neox_model_dir, "--prompt", "x", "--device", "cpu")
    assert result.exit_code == 2 and "needs a tokenizer" in result.output
    result = run("generate", neox_model_dir, "--prompt", "x", "--tokenizer", tmp_path / "missing.json")
    assert result.exit_code == 2 and "tokenizer file not found" in result.output


def test_console_process_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "ssmq", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
