"""One run per OUT, with real processes: a conversion stopped (SIGSTOP, through convert's test hook) while it
holds OUT; a second convert or export into the same place is refused with exit 4 and the holder's pid, and the
first then finishes bit-identical to an undisturbed run. A file taken from under a stopped run before its
commit makes the commit fail instead of publishing an OUT whose index names missing shards.

No sleeps: the parent waits for the child to stop (``waitpid`` with ``WUNTRACED``) and resumes it by SIGCONT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.io import OutputLock
from transgqla.io.staging import PROGRESS, staging_path

from conftest import make_source

runner = CliRunner()
ARGS = ["--kv-lora-rank", "24", "--qk-rope-dim", "8", "--max-shard-size", "0.00002"]  # ~20 kB shards


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one-run") / "src"
    make_source(folder, "llama", layers=2, dtype=torch.bfloat16)
    return folder


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-run-clean") / "out"
    r = invoke("convert", src, out, *ARGS)
    assert r.exit_code == 0, r.output
    return out


def stopped_convert(src: Path, out: Path, point: str) -> subprocess.Popen:
    """A ``convert`` child that stopped itself at ``point`` (``shard:N`` or ``commit``) while holding OUT."""
    env = {**os.environ, "TRANSGQLA_TEST_KILL": point, "TRANSGQLA_TEST_KILL_SIGNAL": "STOP"}
    cmd = [sys.executable, "-m", "transgqla.cli.app", "convert", str(src), str(out), *ARGS]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(p.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        p.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the child ended before its stop point (status {p.returncode}): {p.stderr.read()}")
    return p


def resume(p: subprocess.Popen) -> tuple[int, str]:
    p.send_signal(signal.SIGCONT)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_second_convert_is_refused_while_the_first_runs_and_the_first_finishes_whole(src, clean, tmp_path):
    out = tmp_path / "out"
    first = stopped_convert(src, out, "shard:1")
    try:
        for extra in ([], ["--force"], ["--resume"]):
            r = invoke("convert", src, out, *ARGS, *extra)
            assert r.exit_code == 4, r.output
            line = one_error_line(r.stderr)
            assert f"is in use by another transgqla run (pid {first.pid}" in line and "convert" in line, line
        journal = json.loads((staging_path(out) / PROGRESS).read_text())
        assert len(journal["shards"]) == 1  # the stopped run's work is untouched
        r = invoke("export", out, tmp_path / "dst", "--path", "gqa")  # reading a half-written OUT: refused
        assert r.exit_code == 4 and "in use" in one_error_line(r.stderr), r.output
    finally:
        code, err = resume(first)
    assert code == 0, err
    assert files_of(out) == files_of(clean)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder, no lock file


def test_a_shard_taken_before_the_commit_fails_it(src, tmp_path):
    out = tmp_path / "out"
    first = stopped_convert(src, out, "commit")  # everything written, the manifest too
    try:
        victim = sorted(staging_path(out).glob("model-*.safetensors"))[1]
        victim.unlink()
    finally:
        code, err = resume(first)
    assert code == 4, err
    line = one_error_line(err)
    assert f"incomplete: {victim.name} is missing" in line and "was not written" in line, line
    assert not out.exists()


def test_exports_into_a_held_destination_are_refused(clean, tmp_path):
    dst = tmp_path / "dst"
    with OutputLock(dst, "export"):
        for extra in ([], ["--fold-kv"]):
            r = invoke("export", clean, dst, "--path", "gqa", *extra)
            assert r.exit_code == 4 and f"pid {os.getpid()}" in one_error_line(r.stderr), r.output
        assert not dst.exists() and not staging_path(dst).exists()
    gguf = tmp_path / "m.gguf"
    with OutputLock(gguf, "export"):
        r = invoke("export", clean, gguf, "--path", "absorb", "--format", "gguf")
        assert r.exit_code == 4 and "in use" in one_error_line(r.stderr), r.output
    assert not gguf.exists() and not (tmp_path / ".m.gguf.transgqla-partial").exists()
    r = invoke("export", clean, dst, "--path", "gqa")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_force_onto_a_symlinked_out_is_refused_up_front_and_stays_refusable(src, clean, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(real)
    for _ in range(2):  # the same one line every time: no state is left behind
        r = invoke("convert", src, tmp_path / "out", *ARGS, "--force")
        assert r.exit_code == 4 and "is a symbolic link" in one_error_line(r.stderr), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"] and (real / "keep.txt").is_file()
    r = invoke("convert", src, real, *ARGS, "--force")  # the folder itself
    assert r.exit_code == 0, r.output
    assert files_of(real) == files_of(clean)
