"""Provenance that holds: resume refuses to mix two sources when a Hub-cache shard's content changed with its
size, modification time and header kept (the blob's content hash is in the fingerprint), refuses to resume across
a change of torch / BLAS / CPU code path (other bits), records both in config.json, and records the source's
resolved path so that verify finds it from any working folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from transgqla import convert as convert_mod
from transgqla.convert import ConvertRequest, convert
from transgqla.errors import OutputError
from transgqla.io import sha256_file
from transgqla.provenance import numerical_environment
from transgqla.verify import run_verify

from conftest import make_source

SETTINGS = dict(kv_lora_rank=24, qk_rope_dim=8, max_shard_bytes=20000)  # ~20 kB shards


pytestmark = pytest.mark.usefixtures("sigint_raises_keyboard_interrupt")  # conftest.py


def interrupted(request: ConvertRequest, monkeypatch, kill: str = "shard:3") -> None:
    monkeypatch.setenv("TRANSGQLA_TEST_KILL", kill)
    monkeypatch.setenv("TRANSGQLA_TEST_KILL_SIGNAL", "INT")
    with pytest.raises(KeyboardInterrupt):
        convert(request)
    monkeypatch.delenv("TRANSGQLA_TEST_KILL")


def hub_snapshot(src: Path, root: Path) -> Path:
    """``src`` laid out as a Hugging Face cache snapshot: every file a link to a blob named by its sha256."""
    snap, blobs = root / "models--o--m" / "snapshots" / "abc", root / "models--o--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        blob = blobs / sha256_file(f)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_resume_refuses_a_hub_shard_whose_content_changed_behind_the_same_header_size_and_mtime(tmp_path,
                                                                                             monkeypatch):
    make_source(tmp_path / "src", "llama", layers=2)
    snap = hub_snapshot(tmp_path / "src", tmp_path / "hub")
    out = tmp_path / "out"
    request = ConvertRequest(source=str(snap), out=out, calib=None, **SETTINGS)
    interrupted(request, monkeypatch)
    # a new revision of one shard: other values, the same header (names, dtypes, shapes), size and mtime
    link = sorted(snap.glob("model-*.safetensors"))[-1]
    old_blob = link.resolve()
    stat = old_blob.stat()
    tensors = {k: v + 1.0 for k, v in load_file(old_blob).items()}
    save_file(tensors, tmp_path / "new.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "new.safetensors").stat().st_size == stat.st_size
    new_blob = old_blob.parent / sha256_file(tmp_path / "new.safetensors")
    shutil.move(tmp_path / "new.safetensors", new_blob)
    os.utime(new_blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    link.unlink()
    link.symlink_to(os.path.relpath(new_blob, snap))
    with pytest.raises(OutputError, match="made from another source or with other settings"):
        convert(ConvertRequest(source=str(snap), out=out, calib=None, resume=True, **SETTINGS))


def test_resume_refuses_another_numerical_environment(tmp_path, monkeypatch):
    make_source(tmp_path / "src", "llama", layers=2)
    out = tmp_path / "out"
    request = ConvertRequest(source=str(tmp_path / "src"), out=out, calib=None, **SETTINGS)
    interrupted(request, monkeypatch)
    other = {**numerical_environment("cpu"), "torch": "9.9.9", "blas": "openblas"}
    monkeypatch.setattr(convert_mod, "numerical_environment", lambda device: other)
    blas = numerical_environment("cpu")["blas"]
    with pytest.raises(OutputError, match=re.escape(f"another numerical environment (blas {blas} -> openblas; torch "
                                                    f"{torch.__version__} -> 9.9.9)")) as exc:
        convert(ConvertRequest(source=str(tmp_path / "src"), out=out, calib=None, resume=True, **SETTINGS))
    assert "rerun without --resume" in str(exc.value)
    result = convert(ConvertRequest(source=str(tmp_path / "src"), out=out, calib=None, resume=True, force=True,
                                    **SETTINGS))
    assert "another environment; discarded" in result.resume["note"]


def test_the_environment_and_the_source_are_recorded(tmp_path, monkeypatch):
    make_source(tmp_path / "src", "llama", layers=2)
    monkeypatch.chdir(tmp_path)
    convert(ConvertRequest(source="src", out=Path("out"), calib=None, kv_lora_rank=24, qk_rope_dim=8))
    gq = json.loads((tmp_path / "out" / "config.json").read_text())["gqla"]
    env = gq["conversion"]["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and "blas" in env and "cpu_capability" in env
    source = gq["source"]
    assert source["source"] == "src" and source["path"] == str((tmp_path / "src").resolve())
    shards = sorted(p.name for p in (tmp_path / "src").glob("*.safetensors"))
    assert [s["file"] for s in source["shards"]] == shards
    assert all(len(s["header_sha256"]) == 64 and s["content_sha256"] is None for s in source["shards"])
    # verify from another folder still finds the source (it was recorded as typed: "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = run_verify(tmp_path / "out", checks=["fidelity"], device="cpu", seqlen=16)
    assert report.ok and report.info["source"] == str((tmp_path / "src").resolve())
    assert report.get("fidelity.kl").ok is not None
