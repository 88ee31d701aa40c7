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


# -- visible long work --------------------------------------------------------------------


def _calibrated_source(source_factory, tokenizer=True):
    from test_calibration import make_tokenizer

    src, _ = source_factory("llama", layers=3)
    if tokenizer:
        make_tokenizer(src)
    return src


def test_calibrated_conversion_says_what_runs_then_one_line_per_layer(source_factory, tmp_path):
    """Off a terminal (a CI log): the plan first, then ``layer i/N, elapsed, ETA`` per layer."""
    src = _calibrated_source(source_factory)
    text = tmp_path / "calib.txt"
    from test_calibration import tiny_text

    text.write_text(tiny_text(2000))
    r = invoke("convert", src, tmp_path / "out", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--calib", text,
               "--calib-tokens", 256, "--calib-seqlen", 32, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4, r.stderr
    assert "method gqla" in lines[0] and "256 tokens = 8 windows of 32" in lines[0] and "device cpu" in lines[0]
    assert [ln.split(",")[0] for ln in lines[1:]] == ["layer 1/3", "layer 2/3", "layer 3/3"]
    assert all("elapsed" in ln and "ETA" in ln for ln in lines[1:]) and "in all" in lines[1]
    assert json.loads(r.stdout)["ok"]


def test_line_progress_estimates_from_the_first_layer():
    import io

    from transgqla.cli.progress import LineProgress

    now = [100.0]
    stream = io.StringIO()
    p = LineProgress(stream, clock=lambda: now[0])
    p.update(2, 10)  # resumed: two layers already done
    for done in (3, 4):
        now[0] += 30
        p.update(done, 10)
    lines = stream.getvalue().splitlines()
    assert lines == ["2/10 layers already done",
                     "layer 3/10, elapsed 30 s, ETA 3 min 30 s "
                     "(estimate from the first layer: about 4 min 00 s in all)",
                     "layer 4/10, elapsed 1 min 00 s, ETA 3 min 00 s"]


def test_method_pca_works_whatever_files_the_source_ships(source_factory, tmp_path):
    src = _calibrated_source(source_factory)  # ships tokenizer.json: --calib auto would pick builtin:calib
    r = invoke("convert", src, tmp_path / "out", "--method", "pca", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["settings"]["method"] == "pca" and doc["settings"]["calib"] == "none"
    assert r.stderr.strip() == ""


def test_calib_auto_without_a_tokenizer_says_it_fell_back(source_factory, tmp_path):
    src = _calibrated_source(source_factory, tokenizer=False)
    r = invoke("convert", src, tmp_path / "out", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--json")
    assert r.exit_code == 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --calib auto") and "weights-only" in lines[0]
    assert json.loads(r.stdout)["settings"]["calib"] == "none"
    r = invoke("convert", src, tmp_path / "out2", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--calib", "none", "--json")
    assert r.exit_code == 0 and r.stderr.strip() == ""
