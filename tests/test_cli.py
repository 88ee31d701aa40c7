"""The command line: one-line errors with meaningful exit codes, nothing that looks complete left behind."""

import json
import os

import pytest
from typer.testing import CliRunner

from transgqla import __version__
from transgqla.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _no_checkpoint(out):
    return not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()


def _one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_convert_json_summary(source_factory, tmp_path):
    src, _ = source_factory("llama")
    r = invoke("convert", src, tmp_path / "out", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["settings"]["kv_lora_rank"] == 24 and doc["cache_values_per_token"]["absorb"] == 32


def test_non_empty_out_without_force(source_factory, tmp_path):
    src, _ = source_factory("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke("convert", src, out)
    assert r.exit_code == 4 and "not empty" in _one_line_error(r) and "--force" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    r = invoke("convert", src, out, "--force", "--kv-lora-rank", 24, "--qk-rope-dim", 8)
    assert r.exit_code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_missing_shard(source_factory, tmp_path):
    src, _ = source_factory("llama")
    os.remove(sorted(src.glob("model-*.safetensors"))[1])
    r = invoke("convert", src, tmp_path / "out")
    assert r.exit_code == 2 and "model-00002" in _one_line_error(r)
    assert _no_checkpoint(tmp_path / "out")
    assert not list(tmp_path.glob(".out.transgqla-partial"))


def test_rank_above_maximum(source_factory, tmp_path):
    src, _ = source_factory("llama", n_kv=2, head_dim=16)
    r = invoke("convert", src, tmp_path / "out", "--kv-lora-rank", 1000, "--qk-rope-dim", 8)
    assert r.exit_code == 2 and "1..56" in _one_line_error(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture(source_factory, tmp_path, arch):
    src, _ = source_factory("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = [arch]
    (src / "config.json").write_text(json.dumps(cfg))
    r = invoke("convert", src, tmp_path / "out", "--json")
    assert r.exit_code == 3
    doc = json.loads(r.stdout.splitlines()[0])
    assert "LlamaForCausalLM" in doc["error"] and "Qwen2ForCausalLM" in doc["error"] and arch in doc["error"]
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_refused(source_factory, tmp_path):
    src, _ = source_factory("llama")
    for f in src.glob("*.safetensors*"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    r = invoke("convert", src, tmp_path / "out")
    assert r.exit_code == 2 and "safetensors" in _one_line_error(r)
    assert not (tmp_path / "out").exists()


def test_source_is_never_modified(source_factory, tmp_path):
    src, _ = source_factory("qwen2")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert invoke("convert", src, tmp_path / "out", "--kv-lora-rank", 24, "--qk-rope-dim", 8).exit_code == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    r = invoke("convert", src, src / "inside")
    assert r.exit_code == 4 and "overlaps" in r.output


def test_dry_run_writes_nothing(source_factory, tmp_path):
    src, _ = source_factory("llama")
    r = invoke("convert", src, tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["dry_run"] is True
    assert not (tmp_path / "out").exists()


def test_calib_auto_uses_builtin_text_when_a_tokenizer_exists(source_factory, tmp_path, monkeypatch):
    from test_calibration import make_tokenizer

    monkeypatch.setenv("TRANSGQLA_FORTUNE_DIR", str(tmp_path / "no-fortunes"))  # auto: documentation alone
    src, _ = source_factory("llama", layers=1)
    r = invoke("convert", src, tmp_path / "plain", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["settings"]["calib"] == "none"
    make_tokenizer(src)
    r = invoke("convert", src, tmp_path / "auto", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--calib-tokens", 512,
               "--calib-seqlen", 64, "--json")
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    assert settings["calib"] == "builtin:calib" and settings["method"] == "gqla"
