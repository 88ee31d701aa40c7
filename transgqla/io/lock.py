"""One run per output: a lock beside OUT, held for the whole life of the run that writes it.

Why: two runs writing the same OUT share its staging folder. Without a lock a second run that is not
resuming deletes the first one's staging folder under it, and the first then commits an OUT whose index and
manifest name shards that are gone. Every writer (``convert``, ``export``, any later command) goes through
:class:`~transgqla.io.staging.StagedOutput`, which takes this lock before it touches anything; a second run
is refused with one line that says who holds it.

How: ``fcntl.flock`` on ``<parent>/.<name>.transgqla-lock``. The kernel drops the lock when its holder dies,
even by SIGKILL, so a stale file never blocks anyone: only a live holder does. The file records the holder
(pid, command, host, start time) for the refusal message and is removed on release; an acquirer checks that
the file it locked is still the one at the path and retries otherwise (the usual guard against the race of
locking a file that its previous holder has just unlinked).

Exclusive (a writer) or shared (a reader: ``export`` reading OUT takes it shared, so that a ``convert
--force`` cannot replace OUT under it). POSIX only (``fcntl``); where it is missing the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from transgqla.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".transgqla-lock"
_RETRIES = 8  # a lock file unlinked between our open and our flock: try again

__all__ = ["LOCK_SUFFIX", "OutputLock", "lock_path"]


def lock_path(target: Path) -> Path:
    """Where the lock of ``target`` (a folder or a file) lives: ``<parent>/.<name>.transgqla-lock``."""
    target = Path(target).expanduser().absolute()
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    """Who holds the lock, from what it wrote into the file (best effort)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {int(info['pid'])} on {info.get('host', '?')}, transgqla {info.get('command', '?')}, "
                f"since {info.get('started', '?')}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a run reading it, or one that is starting"


class OutputLock:
    """An exclusive (or shared) lock on ``target``; :meth:`acquire` raises a one-line OutputError (exit 4)
    naming the holder when another live run has it. Use as a context manager or call :meth:`release`."""

    def __init__(self, target: Path, command: str, *, shared: bool = False) -> None:
        self.target = Path(target).expanduser().absolute()
        self.path = lock_path(self.target)
        self.command, self.shared = command, shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None or fcntl is None:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.path.parent}: {exc.strerror or exc}") from None
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        for _ in range(_RETRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{self.target} is in use by another transgqla run ({_holder(self.path)}); "
                                  "wait for it to finish or stop it (one run per output)") from None
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its previous holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            if not self.shared:
                self._record(fd)
            return self
        raise OutputError(f"cannot lock {self.path}: it keeps being replaced")

    def _record(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without the note; the refusal then says less

    def release(self) -> None:
        """Drop the lock; an exclusive holder (or the last shared one) removes the file first."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.shared:  # remove the file only when no other reader holds it
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return
            try:
                if os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a holder dropped without release (an exception path) still lets go
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
