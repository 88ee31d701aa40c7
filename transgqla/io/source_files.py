"""The one way a file of an input folder (a source, or OUT for an export) is opened to be copied or read.

Why: users publish what transgqla writes. A ``tokenizer_config.json`` that is a symlink to the system's password
file must not be followed into OUT, listed in its manifest and uploaded. The reader already holds shards to a
rule; every other file a run copies or reads is held to the same one here:

* **inside the folder** once links are resolved, or, for a Hugging Face cache snapshot (whose files are links
  into ``models--o--n/blobs/``), inside that blobs folder;
* **a regular file** (not a folder, FIFO or device: reading ``/dev/zero`` never ends);
* **opened without following links**: the resolved path is opened with ``O_NOFOLLOW`` (and ``O_NONBLOCK``, so
  a FIFO swapped in cannot hang the open) and checked again on the open descriptor, so a link swapped in
  after the check is refused, not followed.

Failures are one-line :class:`~transgqla.errors.InputError` s naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from transgqla.errors import InputError

__all__ = ["allowed_roots", "checked_path", "copy_checked", "open_checked", "read_checked"]


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where a file of ``folder`` may really live: the folder itself and, for a Hugging Face cache snapshot
    (``models--o--n/snapshots/<sha>/``), that repository's ``blobs/`` folder."""
    folder = Path(folder).absolute()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append((folder.parent.parent / "blobs").resolve())
    return tuple(roots)


def checked_path(folder: Path, name: str) -> Path:
    """The real path of ``folder/name`` after the rule above (the open still re-checks it)."""
    path = Path(folder) / name
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise InputError(f"{path}: not a plain file name")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InputError(f"{path} cannot be resolved (a dangling or looping symlink)") from None
    if not any(real == root or real.is_relative_to(root) for root in allowed_roots(folder)):
        raise InputError(f"{path} is a symlink to {real}, outside the checkpoint folder; only the folder's own "
                         "files are copied (replace the link by the file itself)")
    mode = os.stat(real, follow_symlinks=False).st_mode
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file")
    return real


def open_checked(folder: Path, name: str) -> BinaryIO:
    """``folder/name`` opened for reading under the rule above."""
    real = checked_path(folder, name)
    where = Path(folder) / name
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"cannot open {where}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{where} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_checked(folder: Path, name: str, limit: int) -> bytes:
    """The whole of ``folder/name`` (at most ``limit`` bytes, else a one-line error) under the rule above."""
    with open_checked(folder, name) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise InputError(f"cannot read {Path(folder) / name}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(f"{Path(folder) / name} is larger than {limit / 2**20:.0f} MiB; refusing to read it whole")
    return data


def copy_checked(folder: Path, name: str, dst: Path) -> tuple[str, int]:
    """Copy ``folder/name`` to ``dst`` under the rule above; returns (sha256 hex, bytes)."""
    from transgqla.io.writer import copy_stream_sized

    with open_checked(folder, name) as fh:
        return copy_stream_sized(fh, Path(folder) / name, dst)
