"""`ssmq sweep alpha`: one calibration, one checkpoint and one perplexity per α, distinct directories."""

import json
from types import SimpleNamespace

import pytest

import ssmq
from ssmq.eval.perplexity import evaluate_ppl
from ssmq.quant.sweep import alpha_dir

from test_scales_helpers import (CAL, build_fp, calibration_docs, per_document_abs_values, percentile_scale, run,
                                 tree_digest)

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.\n" * 8
EVAL = dict(seqlen=32, limit=2)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    ck = SimpleNamespace(fp=build_fp(root))
    (root / "eval.txt").write_text(TEXT)
    before = tree_digest(ck.fp)
    result = run("sweep", "alpha", ck.fp, "--alphas", "0.999,0.999999,1.0", "--n", CAL["n"], "--seqlen", CAL["seqlen"],
                 "--eval", "ppl", "--eval-data", root / "eval.txt", "--eval-seqlen", EVAL["seqlen"],
                 "--limit", EVAL["limit"], "-o", root / "out")
    assert result.exit_code == 0, result.output
    assert tree_digest(ck.fp) == before
    ck.out, ck.output, ck.eval = root / "out", result.stdout, root / "eval.txt"
    return ck


def test_one_directory_per_alpha_and_a_table(swept):
    assert alpha_dir(0.999999) != alpha_dir(1.0) == "alpha-1.0"
    names = sorted(p.name for p in swept.out.iterdir())
    assert names == ["alpha-0.999", "alpha-0.999999", "alpha-1.0", "stats", "sweep.json", "sweep.png"]
    lines = swept.output.splitlines()
    assert lines[0].split() == ["alpha", "checkpoint", "ppl", "Δ", "vs", "fp", "Δ%"]
    assert [line.split()[0] for line in lines[2:6]] == ["fp", "0.999", "0.999999", "1.0"]
    assert (swept.out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_each_checkpoint_has_its_alpha_and_its_perplexity(swept):
    result = json.loads((swept.out / "sweep.json").read_text())
    fp, tok = ssmq.load(swept.fp)
    assert result["fp"]["ppl"] == pytest.approx(evaluate_ppl(fp, tok, swept.eval, **EVAL)["ppl"], rel=1e-9)
    conv = per_document_abs_values(swept.fp, calibration_docs(swept.out / "stats"),
                                   ["layers.0.conv.out", "layers.1.conv.out"])
    base = None
    for row in result["results"]:
        qm, tok = ssmq.load(swept.out / row["dir"])
        if row["alpha"] == 1.0:
            assert row["ppl"] == pytest.approx(evaluate_ppl(qm, tok, swept.eval, **EVAL)["ppl"], rel=1e-9)
        assert row["delta_ppl"] == pytest.approx(row["ppl"] - result["fp"]["ppl"])
        for name, samples in conv.items():
            assert qm.scales[name].item() == pytest.approx(percentile_scale(samples, row["alpha"]), rel=1e-5)
        for i in range(2):
            for tap in ("conv.out", "ssm.state"):
                entry = qm.scales.entry(f"layers.{i}.{tap}")
                assert entry.observer == "percentile" and entry.params["alpha"] == row["alpha"]
        minmax = {n: qm.scales[n] for n in qm.scales.names() if not n.endswith(("conv.out", "ssm.state"))}
        if base is not None:  # calibrated once: the other scales are identical in every checkpoint
            assert all(v.equal(base[n]) for n, v in minmax.items())
        base = minmax


def test_only_the_named_scales_are_swept(swept, tmp_path):
    result = run("sweep", "alpha", swept.fp, "--alphas", "1.0", "--scales", "layers.1.conv.out", "--n", CAL["n"],
                 "--seqlen", CAL["seqlen"], "--eval-data", swept.eval, "--eval-seqlen", 32, "--limit", 1,
                 "-o", tmp_path / "one", "--json")
    assert result.exit_code == 0, result.output
    qm, _ = ssmq.load(tmp_path / "one" / "alpha-1.0")
    assert qm.scales.entry("layers.1.conv.out").params["alpha"] == 1.0
    assert qm.scales.entry("layers.0.conv.out").params["alpha"] == 0.9995
    assert json.loads(result.output)["scales"] == ["layers.1.conv.out"]


@pytest.mark.parametrize("args, message", [
    (["--alphas", "1,1.0"], "alpha 1.0 is given twice"),
    (["--alphas", "0.999,1.5"], "alpha must be in (0, 1]"),
    (["--alphas", "0.999,x"], "alpha 'x' is not a number"),
    (["--alphas", "0.999", "--scales", "*.conv.outt"], "matches no tap"),
    (["--alphas", "0.999", "--recipe", "dynamic"], "no α to sweep"),
])
def test_bad_sweeps_exit_2_and_write_nothing(swept, tmp_path, args, message):
    result = run("sweep", "alpha", swept.fp, *args, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
    result = run("sweep", "alpha", swept.fp, "--alphas", "0.999", "-o", swept.fp)
    assert result.exit_code == 2 and "is the source model" in result.output
