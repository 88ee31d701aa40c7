"""Refused up front, in one line with the documented exit code, instead of written wrong: what convert would write
that its own verify or runtime rejects, a damaged copied tensor, settings that crash, and the failing-disk paths of
the GGUF export. Nothing is left behind: no OUT, no staging folder (also when a run is interrupted before its first
shard)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.format import MANIFEST
from transgqla.io import sha256_file

from conftest import make_source

runner = CliRunner()
SMALL = ["--kv-lora-rank", "24", "--qk-rope-dim", "8", "--calib", "none"]


pytestmark = pytest.mark.usefixtures("sigint_raises_keyboard_interrupt")  # conftest.py


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upfront") / "src"
    make_source(folder, "llama", layers=2)
    return folder


@pytest.fixture
def src(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "src")
    return tmp_path / "src"


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, name: str, fn) -> None:
    """Apply ``fn`` to the shard dict holding ``name`` (it may add tensors) and keep the index in step."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(folder / shard)
    fn(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def refused(src: Path, code: int, *extra) -> str:
    out = src.parent / "out"
    r = invoke("convert", src, out, *SMALL, *extra)
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not out.exists() and not (src.parent / ".out.transgqla-partial").exists()
    assert not (src.parent / ".out.transgqla-lock").exists()
    return lines[0]


def test_an_unknown_activation_is_refused(src):
    edit_config(src, hidden_act="swishy")
    assert "activation 'swishy' (hidden_act) is not supported" in refused(src, 3)


@pytest.mark.parametrize("params, why", [
    ({"rope_type": "llama3", "factor": 8.0}, "KeyError 'low_freq_factor'"),
    ({"rope_type": "linear", "factor": "eight"}, "ValueError"),
    ({"rope_type": "linear", "factor": 0.0}, "not all finite and positive"),
])
def test_bad_rope_scaling_parameters_are_refused(src, params, why):
    edit_config(src, rope_parameters={"rope_theta": 10000.0, **params}, rope_scaling=None)
    line = refused(src, 2)
    assert "config.json: " in line and "RoPE frequencies" in line and why in line, line


@pytest.mark.parametrize("value", ["1e-5", None, -1.0, float("nan")])
def test_a_bad_rms_norm_eps_is_one_line(src, value):
    edit_config(src, rms_norm_eps=value)
    assert "rms_norm_eps must be a finite positive number" in refused(src, 2)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.norm.weight"])
def test_nan_in_a_copied_tensor_is_refused_not_copied(src, name):
    def poison(tensors):
        t = tensors[name].clone()
        t.view(-1)[7] = float("nan")
        tensors[name] = t

    edit_tensors(src, name, poison)
    line = refused(src, 2, "--max-shard-size", "0.00002")  # small shards: some are finished before the NaN
    assert f"tensor {name} holds NaN or Inf values" in line


def test_unexpected_tensors_are_refused_with_their_names(src):
    def add(tensors):
        tensors["model.layers.0.mlp.adapter.weight"] = torch.zeros(4, 4)
        tensors["extra_head.weight"] = torch.zeros(4)

    edit_tensors(src, "model.layers.0.mlp.up_proj.weight", add)
    line = refused(src, 3)
    assert "2 tensor(s) the llama block does not name" in line and "model.layers.0.mlp.adapter.weight" in line
    assert "extra_head.weight" in line


def test_an_interrupt_before_the_first_shard_leaves_nothing(src, monkeypatch):
    monkeypatch.setenv("TRANSGQLA_TEST_KILL", "tensor:1")
    monkeypatch.setenv("TRANSGQLA_TEST_KILL_SIGNAL", "INT")
    r = invoke("convert", src, src.parent / "out", *SMALL)
    assert r.exit_code == 130 and "interrupted; nothing was written" in r.stderr, r.output
    assert sorted(p.name for p in src.parent.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upfront-out") / "out"
    r = invoke("convert", base, out, *SMALL)
    assert r.exit_code == 0, r.output
    return out


def test_verify_reads_an_unknown_family_key_as_a_failed_check(converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["gqla"]["family"]["surprise"] = 1
    cfg["rms_norm_eps"] = "tiny"
    (out / "config.json").write_text(json.dumps(cfg))
    doc = json.loads((out / MANIFEST).read_text())
    doc["files"]["config.json"], doc["sizes"]["config.json"] = sha256_file(out / "config.json"), len(
        (out / "config.json").read_bytes())
    (out / MANIFEST).write_text(json.dumps(doc))
    r = invoke("verify", out, "--device", "cpu", "--json")
    assert r.exit_code == 5, r.output
    failed = {c["name"]: c["message"] for c in json.loads(r.stdout)["checks"] if c["ok"] is False}
    assert "the layer geometry cannot be built from config.json" in failed["structure.config"], failed


@pytest.mark.parametrize("err, words, code", [(errno.EROFS, "cannot write", 4), (errno.ENOSPC, "disk full", 4)])
def test_a_failing_disk_under_the_gguf_export_is_one_line(converted, tmp_path, monkeypatch, err, words, code):
    from transgqla.export import gguf_export

    def failing(src, path, *args, **kw):
        path.write_bytes(b"GGUF partial")
        raise OSError(err, "the disk said no")

    monkeypatch.setattr(gguf_export, "write_gguf", failing)
    dst = tmp_path / "m.gguf"
    r = invoke("export", converted, dst, "--path", "absorb", "--format", "gguf")
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no DST, no partial file, no lock
