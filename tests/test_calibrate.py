"""Calibration data, the runner (batching, determinism, NaN), `ssmq.calibrate` and `ssmq calibrate`."""

import json

import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

import ssmq
from ssmq.cli.main import cli
from ssmq.data import CalibrationData, default_data_path, file_sha256, load_calibration_data
from ssmq.errors import SsmqError
from ssmq.quant.calibrate import calibrate, run_calibration
from ssmq.quant.stats import CalibrationStats

from conftest import NEOX_TOKENIZER, SHARED_DATA, random_ids, tiny_config


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(NEOX_TOKENIZER))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny random models whose embedding fits the GPT-NeoX tokenizer, saved with it."""
    root = tmp_path_factory.mktemp("models")
    return {arch: ssmq.save(ssmq.build_model(tiny_config(arch, vocab_size=50280), seed=2), root / arch,
                            tokenizer=NEOX_TOKENIZER) for arch in ("mamba1", "mamba2")}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# --- data -----------------------------------------------------------------------------------------

def test_default_data_is_pile_documents_0_to_255(tok):
    data = load_calibration_data(tok, n=5, seqlen=32, seed=1)
    assert data.source == str(SHARED_DATA / "pile-val-512.jsonl") == str(default_data_path())
    assert data.sha256 == "6b0babbc5de63402138b20c35b17d66167ade812d7384b274da47a686ce88f28"
    assert data.indices == sorted(data.indices) and all(0 <= i < 256 for i in data.indices)
    assert all(1 <= len(ids) <= 32 for ids in data.token_ids)
    assert load_calibration_data(tok, n=5, seqlen=32, seed=1) == data
    assert load_calibration_data(tok, n=5, seqlen=32, seed=2).indices != data.indices
    assert load_calibration_data(tok, seqlen=8).indices == list(range(256))


def test_jsonl_documents_are_truncated_and_empty_ones_skipped(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    texts = ["one two three four five six seven", "", "alpha beta", "\n", "gamma"]
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    data = load_calibration_data(tok, path, seqlen=3)
    assert data.indices == [0, 2, 3, 4] and data.kind == "jsonl-documents"
    assert data.token_ids[0] == tok.encode(texts[0]).ids[:3] and data.token_ids[1] == tok.encode("alpha beta").ids
    assert data.provenance()["sha256"] == file_sha256(path)
    padded = Tokenizer.from_str(tok.to_str())
    padded.enable_padding(length=40)
    padded.enable_truncation(2)
    assert load_calibration_data(padded, path, seqlen=3) == data  # the tokenizer's own settings are ignored


def test_plain_text_is_cut_into_windows(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    stream = tok.encode(path.read_text()).ids
    data = load_calibration_data(tok, path, n=3, seqlen=16, seed=0)
    assert data.kind == "text-windows" and len(data.indices) == 3
    for w, ids in zip(data.indices, data.token_ids):
        assert ids == stream[w * 16:(w + 1) * 16]


@pytest.mark.parametrize("content,kwargs,message", [
    ("", {}, "no documents"),
    ('{"text": "a"}\n{"text": "b"}\n', {"n": 3}, "too short: 2 documents available, n=3"),
    ('{"text": "a"}\nnot json\n', {}, ":2: not valid JSON"),
    ('{"txt": "a"}\n', {}, ":1: expected an object with a string 'text' field"),
    ("short text", {"seqlen": 64}, "too short: 2 tokens, fewer than seqlen=64"),
    ('{"text": "a"}\n', {"seqlen": 0}, "seqlen must be >= 1"),
    ('{"text": "a"}\n', {"n": 0}, "n must be >= 1"),
])
def test_bad_data(tok, tmp_path, content, kwargs, message):
    path = tmp_path / ("d.txt" if content.startswith("short") else "d.jsonl")
    path.write_text(content)
    with pytest.raises(SsmqError, match=message):
        load_calibration_data(tok, path, **kwargs)


# --- runner ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_batches_give_the_results_of_batch_size_one(arch):
    model = ssmq.build_model(tiny_config(arch), seed=4)
    data = CalibrationData.from_token_ids([random_ids(128, (n,), seed=n).tolist() for n in (64, 7, 40, 64, 1, 23)])
    one = run_calibration(model, data, progress=False)
    three = run_calibration(model, data, batch_size=4, progress=False)
    for name, t in one.taps.items():
        u = three.taps[name]
        assert u.count == t.count, name
        torch.testing.assert_close(u.sample_quantiles, t.sample_quantiles, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(u.channel_absmax, t.channel_absmax, rtol=1e-5, atol=1e-6, msg=name)


def test_padding_would_change_the_state_without_the_dt_mask():
    """The negative control of the test above: the padded final state differs from the document's."""
    model = ssmq.build_model(tiny_config("mamba1"), seed=4)
    short = random_ids(128, (1, 7), seed=7)
    padded = torch.cat([short, torch.zeros(1, 20, dtype=torch.long)], dim=1)
    states = []
    with torch.no_grad(), model.taps.hooked("layers.0.ssm.state", lambda n, x: states.append(x.clone())):
        model.backbone(short, None)
        model.backbone(padded, None)
    assert not torch.allclose(states[0], states[1], rtol=1e-3)


def test_non_finite_activation_names_tap_layer_and_document(tmp_path):
    model = ssmq.build_model(tiny_config("mamba1"), seed=4)
    data = CalibrationData.from_token_ids([random_ids(128, (8,), seed=i).tolist() for i in range(3)], "docs.jsonl")
    with torch.no_grad():
        model.backbone.embeddings.weight[data.token_ids[1][3]] = float("nan")
    with pytest.raises(SsmqError, match=r"NaN or Inf\) at tap layers.0.norm.out \(layer 0\), document 1 of docs.jsonl"):
        calibrate(model, data=data, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_api_writes_loadable_stats_with_provenance(model_dirs, tmp_path, tok):
    stats = ssmq_calibrate(model_dirs["mamba2"], tmp_path / "s")
    prov = stats.provenance
    assert prov["model"]["name"] == str(model_dirs["mamba2"]) and len(prov["model"]["sha256"]) == 64
    assert prov["data"]["indices"] == load_calibration_data(tok, n=4, seqlen=24, seed=3).indices
    assert prov["data"]["seqlen"] == 24 and prov["data"]["sha256"] == file_sha256(default_data_path())
    assert prov["tokenizer"]["sha256"] and prov["ssmq_version"] == ssmq.__version__ and prov["batch_size"] == 1
    assert prov["rules"][0] == "*=minmax"
    loaded = CalibrationStats.load(tmp_path / "s")
    assert torch.equal(loaded.tap("layers.1.conv.x").value, stats.tap("layers.1.conv.x").value)
    assert loaded.tap("layers.1.conv.x").value.shape == (2, 4, 4)
    assert loaded.tap("layers.1.ssm.state").value.shape == (2, 8)


def ssmq_calibrate(model_dir, output):
    return calibrate(model_dir, n=4, seqlen=24, seed=3, device="cpu", output=output, progress=False)


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_is_deterministic_to_the_byte(model_dirs, tmp_path):
    outs = []
    for i in range(2):
        result = run("calibrate", model_dirs["mamba1"], "--n", 4, "--seqlen", 32, "--device", "cpu",
                     "-o", tmp_path / f"s{i}", "--rules", "layers.0.conv.out=percentile(alpha=0.9999)", "--json")
        assert result.exit_code == 0, result.output
        outs.append(tmp_path / f"s{i}")
    for name in ("stats.json", "stats.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_cli_table_and_json(model_dirs, tmp_path):
    result = run("calibrate", model_dirs["mamba1"], "--n", 3, "--seqlen", 16, "--device", "cpu", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "layers.1.conv.out     percentile(alpha=0.9995, sigma=0.01)" in result.output
    assert "3 documents" in result.output and "tokens/s" in result.output
    result = run("calibrate", model_dirs["mamba2"], "--n", 3, "--seqlen", 16, "--batch-size", 2, "-o", tmp_path / "b",
                 "--json", "--device", "cpu")
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["provenance"]["batch_size"] == 2 and summary["tokens_per_second"] > 0
    assert summary["taps"]["layers.0.conv.B"]["observer"] == "grouped_minmax(head_groups=4, channel_groups=4)"
    assert len(summary["taps"]["layers.0.conv.B"]["value"]) == 2


@pytest.mark.parametrize("args,message", [
    (["--rules", "layers.*.conv.out=percentile(alpha=1.5)"], "alpha must be in (0, 1]"),
    (["--rules", "layers.*.conv.out=percentile(sigma=0)"], "sigma must be in (0, 1]"),
    (["--rules", "layers.*.conv.out=hist"], "unknown observer 'hist'"),
    (["--rules", "layers.*.conv.out"], "malformed rule"),
    (["--rules", "layers.*.conv.x=minmax"], "matches no tap; taps with a scale: layers.0-1.{norm.out"),
    (["--rules", "layers.*.conv.out=grouped_minmax"], "grouped_minmax is for Mamba2 models"),
    (["--n", "300"], "too short: 256 documents available, n=300"),
    (["--batch-size", "0"], "batch size must be >= 1"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(model_dirs, tmp_path, args, message):
    result = run("calibrate", model_dirs["mamba1"], "--seqlen", 8, "--n", 2, "--device", "cpu", "-o", tmp_path / "out",
                 *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_data_files(model_dirs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run("calibrate", model_dirs["mamba1"], "--data", empty, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no documents (empty data)" in result.output
    result = run("calibrate", model_dirs["mamba1"], "--data", tmp_path / "missing.txt", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "calibration data file not found" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_output_unless_overwrite(model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    args = ["calibrate", model_dirs["mamba1"], "--n", 2, "--seqlen", 8, "--device", "cpu", "-o", out]
    result = run(*args)
    assert result.exit_code == 2 and "exists and is not empty (pass --overwrite" in result.output
    assert (out / "old.txt").read_text() == "keep"
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "stats.safetensors"]
