"""Planned, streaming safetensors writer, and the file primitives every output uses.

Why planned: the full list of output tensors (names, dtypes, shapes) is known before
any data exists, so every shard's header can be written first and tensor data streamed
after it — memory holds one tensor at a time, and files are byte-deterministic.
Where: into a folder the caller owns, normally the staged folder of :mod:`transgqla.io.staging`
(a crash must never leave something that looks like a finished checkpoint at OUT).
Why resumable: each shard is written as `<shard>.partial` and renamed once complete and
fsynced, so a shard file under its final name is always whole; the caller records finished
shards (see `on_shard`) and a later run can pass them back as `completed` and skip them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, TypeVar

import torch

from transgqla.errors import InputError, OutputError
from transgqla.io.safetensors_format import TensorSpec, encode_header, to_torch_dtype

INDEX_NAME = "model.safetensors.index.json"
PARTIAL_SUFFIX = ".partial"  # a shard being written; renamed to its final name when complete
CHUNK = 1 << 20  # 1 MiB
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
T = TypeVar("T")

__all__ = [
    "PARTIAL_SUFFIX",
    "plan_shards",
    "shard_file_name",
    "ShardedWriter",
    "ensure_free_space",
    "fsync_dir",
    "guard_write",
    "sha256_file",
    "copy_file_hashed",
    "copy_file_sized",
    "write_file_atomic",
]


def guard_write(path: Path, fn: Callable[[], T]) -> T:
    """Run a filesystem write, turning OSError into a one-line OutputError naming `path`."""
    try:
        return fn()
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise OutputError(f"disk full while writing {path}; free space and rerun") from None
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split `specs` (order kept) into shards of at most `max_shard_bytes` data bytes;
    a tensor larger than the cap gets a shard of its own. Headers are not counted."""
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_name(i: int, n: int) -> str:
    """Hugging Face style name of shard i (0-based) out of n."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class ShardedWriter:
    """Write a planned set of tensors as HF-style shards plus `model.safetensors.index.json`.

    `write()` (or `skip()`, for a tensor whose shard is in `completed`) must be called once per
    planned tensor, in plan order; `close()` returns `{relative file name: sha256 hex}` for every
    file of the checkpoint (hashed while streaming; completed shards keep their given hash).
    Each shard is streamed into `<name>.partial`, fsynced and renamed to `<name>` when its last
    tensor is written; then `on_shard(index, file name, sha256)` is called.
    Shape/dtype/order mismatches raise ValueError (caller bugs); IO failures OutputError.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[TensorSpec],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        *,
        completed: dict[str, str] | None = None,
        on_shard: Callable[[int, str, str], None] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("ShardedWriter needs at least one tensor")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError("duplicate tensor names in the write plan")
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.plan = plan_shards(list(specs), max_shard_bytes)
        n = len(self.plan)
        self.files = [shard_file_name(i, n) for i in range(n)]
        unknown = set(completed or {}) - set(self.files)
        if unknown:
            raise ValueError(f"completed shards {sorted(unknown)} are not in the shard plan")
        self._headers = [encode_header(shard, self.metadata) for shard in self.plan]  # validates
        self._order = [(i, spec) for i, shard in enumerate(self.plan) for spec in shard]
        self._shard_of = {spec.name: i for i, spec in self._order}
        self._next = 0
        self._fh: BinaryIO | None = None
        self._path: Path | None = None  # the shard's final path (the file being written is .partial)
        self._hash: hashlib._Hash | None = None
        self.hashes: dict[str, str] = dict(completed or {})
        self._done = {self.files.index(f) for f in self.hashes}
        self._on_shard = on_shard
        self._closed = False
        self.sizes: dict[str, int] = {}  # file -> bytes, known once closed (the shards' planned sizes, the index)

    @property
    def total_size(self) -> int:
        """Bytes of tensor data across all shards (the index's metadata.total_size)."""
        return sum(spec.nbytes for _, spec in self._order)

    def shard_sizes(self) -> dict[str, int]:
        """{shard file name: its size in bytes (header included)}."""
        return {f: len(h) + sum(s.nbytes for s in shard) for f, h, shard in zip(self.files, self._headers, self.plan)}

    def is_done(self, name: str) -> bool:
        """True when the planned tensor `name` lies in a shard that is already complete."""
        return self._shard_of[name] in self._done

    def _open(self, i: int) -> None:
        self._path = self.folder / self.files[i]
        tmp = self._path.with_name(self._path.name + PARTIAL_SUFFIX)
        self._fh = guard_write(self._path, lambda: open(tmp, "wb"))
        self._hash = hashlib.sha256()
        self._emit(self._headers[i])

    def _emit(self, data: bytes | memoryview) -> None:
        assert self._fh is not None and self._hash is not None and self._path is not None
        fh = self._fh
        guard_write(self._path, lambda: fh.write(data))
        self._hash.update(data)

    def _finish_shard(self, i: int) -> None:
        assert self._fh is not None and self._hash is not None and self._path is not None
        fh, path = self._fh, self._path
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)

        def sync_close_rename() -> None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(tmp, path)

        guard_write(path, sync_close_rename)
        fsync_dir(self.folder)
        digest = self._hash.hexdigest()
        self.hashes[path.name] = digest
        self._done.add(i)
        self._fh = self._hash = None
        if self._on_shard is not None:
            self._on_shard(i, path.name, digest)

    def _advance(self, shard: int) -> None:
        self._next += 1
        if (self._next == len(self._order) or self._order[self._next][0] != shard) and shard not in self._done:
            self._finish_shard(shard)

    def _expect(self, name: str) -> tuple[int, TensorSpec]:
        if self._closed:
            raise ValueError("ShardedWriter is closed")
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors written)")
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"out-of-order write: expected {spec.name!r}, got {name!r}")
        return shard, spec

    def skip(self, name: str) -> None:
        """Pass over the next planned tensor, which must lie in a completed shard."""
        shard, _ = self._expect(name)
        if shard not in self._done:
            raise ValueError(f"tensor {name!r} is in shard {self.files[shard]}, which is not complete")
        self._next += 1

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview) -> None:
        """Append the next planned tensor: a torch.Tensor of exactly the planned dtype and
        shape (any device), or its raw little-endian bytes of exactly the planned length."""
        shard, spec = self._expect(name)
        if shard in self._done:
            raise ValueError(f"tensor {name!r} is in shard {self.files[shard]}, which is already complete; skip() it")
        if isinstance(data, torch.Tensor):
            want = to_torch_dtype(spec.dtype)
            if data.dtype != want or tuple(data.shape) != spec.shape:
                raise ValueError(
                    f"tensor {name!r} is {data.dtype}{list(data.shape)}, "
                    f"planned {want}{list(spec.shape)}"
                )
            flat = data.detach().to("cpu").contiguous().reshape(-1)
            raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        else:
            raw = memoryview(data).cast("B")
            if raw.nbytes != spec.nbytes:
                raise ValueError(f"tensor {name!r}: got {raw.nbytes} bytes, planned {spec.nbytes}")
        if self._fh is None:
            self._open(shard)
        self._emit(raw)
        self._advance(shard)

    def write_stream(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Append the next planned tensor from raw byte pieces (a large tensor copied through a
        small buffer); together they must be exactly the planned length. A mismatch leaves the
        shard unusable: the caller aborts."""
        shard, spec = self._expect(name)
        if shard in self._done:
            raise ValueError(f"tensor {name!r} is in shard {self.files[shard]}, which is already complete; skip() it")
        if self._fh is None:
            self._open(shard)
        total = 0
        for chunk in chunks:
            raw = memoryview(chunk).cast("B")
            total += raw.nbytes
            if total > spec.nbytes:
                break
            self._emit(raw)
        if total != spec.nbytes:
            self._closed = True
            more = "more than " if total > spec.nbytes else ""
            raise ValueError(f"tensor {name!r}: got {more}{total} bytes, planned {spec.nbytes}")
        self._advance(shard)

    def close(self) -> dict[str, str]:
        """Check every planned tensor was written, write the index; return file -> sha256."""
        if self._closed:
            return dict(self.hashes)
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"{len(self._order) - self._next} planned tensors not written (next: {missing!r})")
        weight_map = {spec.name: self.files[i] for i, spec in self._order}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        path = self.folder / INDEX_NAME

        def write_index() -> None:
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())

        guard_write(path, write_index)
        self.hashes[INDEX_NAME] = hashlib.sha256(data).hexdigest()
        self.sizes = {**self.shard_sizes(), INDEX_NAME: len(data)}
        self._closed = True
        return {f: self.hashes[f] for f in [*self.files, INDEX_NAME]}

    def abort(self) -> None:
        """Release the open file handle without writing the index (partial output stays)."""
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
        self._fh = self._hash = None
        self._closed = True

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def fsync_dir(path: Path) -> None:
    """Best-effort durability of a rename (not supported everywhere, so errors are ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_free_space(folder: Path, needed_bytes: int, margin: float = 1.05) -> None:
    """OutputError unless the filesystem holding `folder` has needed_bytes x margin free."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(needed_bytes * margin)
    if free < need:
        raise OutputError(
            f"not enough disk space in {folder}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
        )


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.hexdigest()


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: write `<path>.tmp`, fsync, rename, fsync the folder.
    A crash leaves either the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")

    def write_replace() -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    guard_write(path, write_replace)
    fsync_dir(path.parent)


def copy_file_hashed(src: Path, dst: Path) -> str:
    """Copy src to dst in 1 MiB chunks (fsynced) and return the sha256 hex of the bytes."""
    return copy_file_sized(src, dst)[0]


def copy_file_sized(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to dst in 1 MiB chunks (fsynced); return (sha256 hex, bytes copied)."""
    try:
        fin = open(src, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {src}: {exc.strerror or exc}") from None
    with fin:
        return copy_stream_sized(fin, src, dst)


def copy_stream_sized(fin: BinaryIO, src: Path, dst: Path) -> tuple[str, int]:
    """Copy the open file ``fin`` (named ``src`` in errors) to dst; return (sha256 hex, bytes copied)."""
    h = hashlib.sha256()
    size = 0
    fout = guard_write(Path(dst), lambda: open(dst, "wb"))
    with fout:
        while True:
            try:
                chunk = fin.read(CHUNK)
            except OSError as exc:
                raise InputError(f"cannot read {src}: {exc.strerror or exc}") from None
            if not chunk:
                break
            guard_write(Path(dst), lambda: fout.write(chunk))
            h.update(chunk)
            size += len(chunk)
        guard_write(Path(dst), lambda: (fout.flush(), os.fsync(fout.fileno())))
    return h.hexdigest(), size
