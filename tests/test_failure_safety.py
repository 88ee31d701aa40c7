"""Failure safety of `transgqla convert`: kills at several points leave only the marked staging folder,
`--resume` finishes bit-identical to an uninterrupted run, a full disk is a one-line error, the source is
only ever read, and the bytes depend neither on the run nor on the thread count.

Kills use the test hook of transgqla/convert.py: TRANSGQLA_TEST_KILL=shard:N | tensor:N | commit sends
the process TRANSGQLA_TEST_KILL_SIGNAL (KILL by default). Real SIGKILL/SIGTERM runs go through a
subprocess; the cheaper in-process kills use SIGINT, which Python turns into KeyboardInterrupt once
its default handler is installed: a process launched in the background by a shell starts with SIGINT
ignored, so the fixture below installs that handler for each test and restores what was there.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.convert import ConversionInterrupted, ConvertRequest, convert
from transgqla.io import writer as writer_mod
from transgqla.io.staging import PROGRESS

from conftest import make_source
from test_calibration import make_tokenizer, tiny_text

runner = CliRunner()
ARGS = ["--kv-lora-rank", "24", "--qk-rope-dim", "8", "--max-shard-size", "0.00002"]  # ~20 kB shards
SETTINGS = dict(kv_lora_rank=24, qk_rope_dim=8, max_shard_bytes=20000)


pytestmark = pytest.mark.usefixtures("sigint_raises_keyboard_interrupt")  # conftest.py


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def staging(out: Path) -> Path:
    return out.parent / f".{out.name}.transgqla-partial"


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same(out: Path, ref: Path) -> None:
    got, want = files_of(out), files_of(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    assert not staging(out).exists()


def assert_interrupted_state(out: Path) -> None:
    """Nothing that looks complete: OUT absent, the staging folder marked INCOMPLETE."""
    assert not out.exists()
    assert (staging(out) / "INCOMPLETE").is_file()


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "src"
    make_source(folder, "qwen2", layers=3, dtype=torch.bfloat16)  # biases, several source shards
    return folder


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    """An uninterrupted conversion (through the CLI, like the interrupted ones)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    r = invoke("convert", src, out, *ARGS)
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("model-*.safetensors"))) > 10
    return out


def _subprocess(src: Path, out: Path, *extra: str, kill: str, signal_name: str = "KILL", sigint: object = None):
    """Run the CLI in a child; ``sigint`` is the SIGINT disposition it starts with (default: Python's)."""
    env = {**os.environ, "TRANSGQLA_TEST_KILL": kill, "TRANSGQLA_TEST_KILL_SIGNAL": signal_name}
    cmd = [sys.executable, "-m", "transgqla.cli.app", "convert", str(src), str(out), *ARGS, *extra]
    start = (lambda: signal.signal(signal.SIGINT, sigint)) if sigint is not None else None
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=start)


def test_real_kills_then_resume_is_bit_identical(src, clean, tmp_path):
    out = tmp_path / "out"
    # 1. SIGKILL after two finished shards.
    p = _subprocess(src, out, kill="shard:2")
    assert p.returncode == -9, p.stderr
    assert_interrupted_state(out)
    journal = json.loads((staging(out) / PROGRESS).read_text())
    assert len(journal["shards"]) == 2
    # 2. Resume, then SIGTERM mid-shard: exit 130, one line pointing at --resume.
    p = _subprocess(src, out, "--resume", kill="tensor:5", signal_name="TERM")
    assert p.returncode == 130, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted") and "--resume" in lines[0], p.stderr
    assert_interrupted_state(out)
    assert len(json.loads((staging(out) / PROGRESS).read_text())["shards"]) >= 2
    # 3. Resume, then SIGKILL with everything written, just before the rename.
    p = _subprocess(src, out, "--resume", kill="commit")
    assert p.returncode == -9, p.stderr
    assert_interrupted_state(out)
    # 4. Resume to the end.
    r = invoke("convert", src, out, *ARGS, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert_same(out, clean)


def test_sigterm_interrupts_a_conversion_started_with_sigint_ignored(tmp_path):
    """A background job (``cmd &``) starts with SIGINT ignored; SIGTERM must still end a calibrated
    conversion with the one-line --resume message, and the resume must finish it."""
    src = tmp_path / "src"
    make_source(src, "llama", layers=3)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    calib = ["--calib", str(text), "--calib-tokens", "256", "--calib-seqlen", "32", "--json"]
    out = tmp_path / "out"
    p = _subprocess(src, out, *calib, kill="shard:3", signal_name="TERM", sigint=signal.SIG_IGN)
    assert p.returncode == 130, p.stderr
    last = p.stderr.strip().splitlines()[-1]  # after the plan and progress lines
    assert last.startswith("error: interrupted") and "--resume" in last, p.stderr
    assert json.loads(p.stdout)["exit_code"] == 130
    assert_interrupted_state(out)
    r = invoke("convert", src, out, *ARGS, *calib, "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resume"]["shards_kept"] == 3


def interrupt_in_process(request: ConvertRequest, monkeypatch, kill: str) -> None:
    """Run ``request`` with an in-process Ctrl-C (SIGINT) at ``kill``; the hook is off afterwards."""
    monkeypatch.setenv("TRANSGQLA_TEST_KILL", kill)
    monkeypatch.setenv("TRANSGQLA_TEST_KILL_SIGNAL", "INT")
    with pytest.raises(KeyboardInterrupt):
        convert(request)
    monkeypatch.delenv("TRANSGQLA_TEST_KILL")


@pytest.mark.parametrize("kill", ["shard:1", "shard:9", "tensor:1", "tensor:30", "commit"])
def test_interrupt_anywhere_then_resume(src, clean, tmp_path, monkeypatch, kill):
    out = tmp_path / "out"
    monkeypatch.setenv("TRANSGQLA_TEST_KILL", kill)
    monkeypatch.setenv("TRANSGQLA_TEST_KILL_SIGNAL", "INT")
    with pytest.raises(ConversionInterrupted, match="--resume"):
        convert(ConvertRequest(source=str(src), out=out, **SETTINGS))
    assert_interrupted_state(out)
    monkeypatch.delenv("TRANSGQLA_TEST_KILL")
    result = convert(ConvertRequest(source=str(src), out=out, resume=True, **SETTINGS))
    assert result.resume["continued"] == (kill != "commit")  # the journal goes just before the rename
    assert_same(out, clean)


def test_resume_without_partial_output_starts_fresh(src, clean, tmp_path):
    out = tmp_path / "out"
    r = invoke("convert", src, out, *ARGS, "--resume", "--json")
    assert r.exit_code == 0, r.output
    resume = json.loads(r.stdout)["resume"]
    assert resume["continued"] is False and "started fresh" in resume["note"]
    assert_same(out, clean)


def test_resume_rewrites_damaged_shards_and_drops_stray_files(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_in_process(ConvertRequest(source=str(src), out=out, **SETTINGS), monkeypatch, "shard:4")
    shards = sorted(p.name for p in clean.glob("model-*.safetensors"))
    shard = staging(out) / shards[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (staging(out) / shards[0]).unlink()
    (staging(out) / "stray.txt").write_text("not part of the checkpoint")
    r = invoke("convert", src, out, *ARGS, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resume"]["shards_kept"] == 2
    assert_same(out, clean)


def test_resume_refuses_a_different_plan(src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_in_process(ConvertRequest(source=str(src), out=out, **SETTINGS), monkeypatch, "shard:2")
    before = files_of(staging(out))
    r = invoke("convert", src, out, "--kv-lora-rank", "32", "--qk-rope-dim", "8", "--max-shard-size", "0.00002",
               "--resume")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 4 and len(lines) == 1 and "without --resume" in lines[0], r.output
    assert files_of(staging(out)) == before and not out.exists()  # kept for a matching --resume
    r = invoke("convert", src, out, "--kv-lora-rank", "32", "--qk-rope-dim", "8", "--resume", "--force", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resume"]["continued"] is False
    assert json.loads((out / "config.json").read_text())["kv_lora_rank"] == 32


def test_disk_full_mid_run_keeps_only_the_marked_staging(src, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    opened = []

    def full_on_fifth_shard(path, mode="r", *a, **k):
        if "w" in mode and str(path).endswith(".safetensors.partial"):
            opened.append(path)
            if len(opened) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *a, **k)

    monkeypatch.setattr(writer_mod, "open", full_on_fifth_shard, raising=False)
    r = invoke("convert", src, out, *ARGS)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 4 and len(lines) == 1, r.output
    assert "disk full while writing" in lines[0] and "model-00005-of-" in lines[0] and "--resume" in lines[0]
    assert_interrupted_state(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [staging(out).name]
    monkeypatch.undo()
    r = invoke("convert", src, out, *ARGS, "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resume"]["shards_kept"] == 4
    assert_same(out, clean)


def test_not_enough_space_up_front_writes_nothing(src, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6, 10))
    r = invoke("convert", src, tmp_path / "out", *ARGS)
    assert r.exit_code == 4 and "not enough disk space" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_source_is_only_read(src, tmp_path, monkeypatch):
    import builtins

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    root = str(src.resolve())
    writes = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *a, **k):
        inside = isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()).startswith(root)
        if inside and set(mode) & set("wax+"):
            writes.append((file, mode))
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if str(Path(path).resolve()).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            writes.append((path, flags))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    convert(ConvertRequest(source=str(src), out=tmp_path / "out", **SETTINGS))
    monkeypatch.undo()
    assert writes == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before
    r = invoke("convert", src, src / "out", *ARGS, "--resume")
    assert r.exit_code == 4 and "overlaps" in r.stderr


def test_calibrated_conversion_resumes_bit_identical(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_source(src, "llama", layers=3)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(3000))
    req = dict(source=str(src), kv_lora_rank=20, qk_rope_dim=8, calib=[str(text)], calib_tokens=512,
               calib_seqlen=32, sequential=True, max_shard_bytes=20000)
    convert(ConvertRequest(out=tmp_path / "clean", **req))
    out = tmp_path / "out"
    interrupt_in_process(ConvertRequest(out=out, **req), monkeypatch, "shard:8")  # inside layer 1
    result = convert(ConvertRequest(out=out, resume=True, **req))
    assert result.resume["shards_kept"] == 8
    assert_same(out, tmp_path / "clean")


def test_bytes_do_not_depend_on_the_thread_count(tmp_path):
    """At this size (2 n_g d = 512, hidden 256) torch's parallel reductions and LAPACK's eigh give other
    bits on 2 threads than on 1; the conversion pins its per-layer math to a fixed thread count, so the
    output does not change (without the pin, config.json's layer errors differ in the last bit)."""
    src = tmp_path / "src"
    make_source(src, "llama", layers=1, hidden=256, n_heads=8, n_kv=4, head_dim=64, shard_size="10MB")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            convert(ConvertRequest(source=str(src), out=tmp_path / f"out{threads}", force=True, kv_lora_rank=128,
                                   qk_rope_dim=32))
    finally:
        torch.set_num_threads(before)
    assert files_of(tmp_path / "out1") == files_of(tmp_path / "out2")


def test_two_runs_are_bit_identical(src, clean, tmp_path):
    r = invoke("convert", src, tmp_path / "again", *ARGS)
    assert r.exit_code == 0, r.output
    assert_same(tmp_path / "again", clean)
