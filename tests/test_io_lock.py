"""io/lock.py and the lock-related duties of io/staging.py: one run per output, a refusal that names the holder,
no stale lock after a kill, the commit's completeness check, a symlinked OUT, and what a killed --force commit
left behind. Other processes are real child processes, synchronised by their output (no sleeps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transgqla.errors import OutputError
from transgqla.io import lock as lock_module
from transgqla.io.lock import OutputLock, lock_path
from transgqla.io.staging import StagedOutput, staging_path

HOLDER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("lock", sys.argv[4])  # the module alone: no torch import
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lock = mod. OutputLock(sys.argv[1], "holder-test", shared=sys.argv[2] == "shared").acquire()
    print("held", flush=True)
    if sys.argv[3] == "die":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
    lock.release()
""")


def _holder(target: Path, shared: bool = False, die: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), "shared" if shared else "excl",
                          "die" if die else "wait", lock_module.__file__],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _let_go(p: subprocess.Popen) -> None:
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(timeout=60) == 0


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    p = _holder(out)
    try:
        with pytest.raises(OutputError, match=rf"in use by another transgqla run \(pid {p.pid} on .*holder-test"):
            OutputLock(out, "convert").acquire()
        with pytest.raises(OutputError, match="in use"):
            OutputLock(out, "export", shared=True).acquire()  # a reader waits for the writer too
    finally:
        _let_go(p)
    with OutputLock(out, "convert") as lock:
        assert lock.held and lock_path(out).is_file()
    assert not lock_path(out).exists()  # released and removed: nothing is left beside OUT


def test_readers_share_and_keep_writers_out(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, shared=True)
    try:
        with OutputLock(out, "export", shared=True):
            with pytest.raises(OutputError, match="in use"):
                OutputLock(out, "convert").acquire()
        assert lock_path(out).exists()  # the other reader still holds it: not removed under it
    finally:
        _let_go(p)
    assert not lock_path(out).exists()
    OutputLock(out, "convert").acquire().release()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    p = _holder(out, die=True)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert lock_path(out).exists()  # its file stays, but the kernel dropped the lock with the process
    with OutputLock(out, "convert"):
        pass
    assert not lock_path(out).exists()


def test_staged_output_holds_the_lock_until_commit(tmp_path):
    out = tmp_path / "out"
    st = StagedOutput(out, force=False, command="convert")
    with pytest.raises(OutputError, match=f"pid {os.getpid()} .*transgqla convert"):
        StagedOutput(out, force=True)
    (st.path / "a.bin").write_bytes(b"abc")
    st.commit({"a.bin": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    StagedOutput(out, force=True).close()  # free again once committed


@pytest.mark.parametrize("damage, why", [("delete", "a.bin is missing"), ("truncate", "a.bin has 1 bytes, 3"),
                                          ("symlink", "a.bin is not a regular file")])
def test_commit_refuses_files_that_are_not_as_written(tmp_path, damage, why):
    out = tmp_path / "out"
    st = StagedOutput(out, force=False)
    (st.path / "a.bin").write_bytes(b"abc")
    if damage == "delete":
        (st.path / "a.bin").unlink()
    elif damage == "truncate":
        (st.path / "a.bin").write_bytes(b"a")
    else:
        (st.path / "a.bin").unlink()
        (tmp_path / "elsewhere").write_bytes(b"abc")
        (st.path / "a.bin").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match=f"incomplete: {why}"):
        st.commit({"a.bin": 3})
    assert not out.exists() and staging_path(out).is_dir()
    st.close()


def test_a_symlinked_out_is_refused_before_anything_is_written(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    for force in (False, True):
        with pytest.raises(OutputError, match="is a symbolic link"):
            StagedOutput(tmp_path / "link", force=force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert (real / "old.txt").read_text() == "old"


def test_a_killed_force_commit_is_cleaned_up_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.transgqla-old"
    # killed after both renames: the previous output is a hidden full-size copy
    out.mkdir()
    (out / "new.txt").write_text("new")
    old.mkdir()
    (old / "big.bin").write_bytes(b"x" * 1000)
    st = StagedOutput(out, force=True)
    assert not old.exists() and any("removed" in n for n in st.notes)
    st.close()
    # killed between the two renames: OUT is gone, the previous output is put back
    out.rename(old)
    st = StagedOutput(out, force=True)
    assert (out / "new.txt").read_text() == "new" and not old.exists()
    assert any("restored" in n for n in st.notes)
    st.close()
