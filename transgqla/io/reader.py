"""Lazy, fully validated reader for Hugging Face safetensors checkpoints.

Why: conversion streams a checkpoint tensor by tensor, so a bad shard must be caught
before any output is produced. Opening a checkpoint therefore validates the index and
every shard header (only the 8 + N header bytes are read); tensors are read later one
at a time with a seek + exact read, never by mapping whole shards.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

import torch

from transgqla.errors import InputError, UnsupportedError
from transgqla.io.safetensors_format import (
    Header,
    HeaderError,
    TensorEntry,
    TensorSpec,
    UnknownDtypeError,
    loads_strict,
    parse_header,
    read_header_length,
    to_torch_dtype,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: The buffer a whole-tensor copy streams through (:meth:`SafetensorsCheckpoint.iter_bytes`): embeddings can be GBs.
COPY_BUFFER_BYTES = 64 * 1024**2
_PICKLE_GLOBS = ("pytorch_model*.bin", "*.pt", "*.pth")
_BLOB_NAME = re.compile(r"^[0-9a-f]{64}$")  # an LFS blob of the Hugging Face cache: the sha256 of its content

__all__ = ["SafetensorsCheckpoint", "TensorSpec"]


def _safe_relative(folder: Path, rel: Any, where: str, extra_roots: tuple[Path, ...]) -> Path:
    """Check that `rel` (a weight_map file name) is a relative path that stays inside
    `folder` even after resolving symlinks; return the (unresolved) path inside folder."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise InputError(f"{where} names an invalid shard file {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", rel):
        raise InputError(f"{where} names shard {rel!r}, which escapes the checkpoint folder")
    path = folder / pure
    if not path.is_file():
        raise InputError(f"{where} names shard {rel!r}, which does not exist in {folder}")
    real = path.resolve()
    roots = (folder.resolve(),) + extra_roots
    if not any(real.is_relative_to(root) for root in roots):
        raise InputError(f"shard {path} is a symlink pointing outside the checkpoint folder")
    return path


def _hf_cache_roots(folder: Path) -> tuple[Path, ...]:
    """Hugging Face cache snapshots (`models--o--n/snapshots/<sha>/`) hold symlinks into
    `models--o--n/blobs/`; allow exactly that blob folder as a symlink target."""
    folder = folder.absolute()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return ((folder.parent.parent / "blobs").resolve(),)
    return ()


class SafetensorsCheckpoint:
    """A validated safetensors checkpoint folder (sharded with an index, or a single file).

    All validation happens in the constructor; afterwards `read(name)` only fails if
    the files change underneath. Reads are safe from several threads (the converter computes
    one layer while it copies another): each thread holds at most one file handle (the last
    shard it read); `close()` (or the context manager) releases every thread's handle.
    """

    def __init__(self, folder: Path | str, *, trusted_roots: tuple[Path, ...] = ()) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"checkpoint folder {self.folder} does not exist or is not a folder")
        roots = tuple(Path(r).resolve() for r in trusted_roots) + _hf_cache_roots(self.folder)
        self._fp = hashlib.sha256()
        self._local = threading.local()  # per thread: .fh, .path (the shard it last read)
        self._handles: set[BinaryIO] = set()
        self._handles_lock = threading.Lock()
        self._entries: dict[str, tuple[Path, TensorEntry]] = {}
        self._headers: dict[Path, Header] = {}
        self._header_sha: dict[Path, str] = {}

        index = self.folder / INDEX_NAME
        if index.is_file():
            self._fp.update(b"index\0")
            weight_map = self._load_index(index)
            where = f"index {index}"
            shard_paths = {
                f: _safe_relative(self.folder, f, where, roots)
                for f in sorted(set(weight_map.values()), key=str)
            }
        else:
            single = self._find_single_file()
            _safe_relative(self.folder, single.name, f"folder {self.folder}", roots)
            shard_paths = {single.name: single}
            weight_map = None
        for rel, path in shard_paths.items():
            self._headers[path] = self._load_header(rel, path)
        if weight_map is None:
            ((path, header),) = self._headers.items()
            weight_map = {name: path.name for name in header.entries}
        for name in sorted(weight_map):
            path = shard_paths[weight_map[name]]
            entry = self._headers[path].entries.get(name)
            if entry is None:
                raise InputError(f"tensor {name!r} is listed in the index but missing from shard {path}")
            self._entries[name] = (path, entry)
        self._names = list(self._entries)

    # -- construction helpers -------------------------------------------------------

    def _load_index(self, index: Path) -> dict[str, str]:
        try:
            raw = index.read_bytes()
            obj = loads_strict(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, HeaderError) as exc:
            raise InputError(f"index {index} is not valid JSON: {exc}".splitlines()[0]) from None
        self._fp.update(raw)
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) for k in wm):
            raise InputError(f"index {index} has no valid 'weight_map' object")
        return wm

    def _find_single_file(self) -> Path:
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return single
        found = sorted(p for p in self.folder.glob("*.safetensors") if p.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            raise InputError(
                f"{self.folder} holds {len(found)} .safetensors files but no {INDEX_NAME}"
            )
        if any(p.is_file() for g in _PICKLE_GLOBS for p in self.folder.glob(g)):
            raise InputError(
                f"{self.folder} holds only pickle (.bin) weights; transgqla reads safetensors only "
                "(convert them with transformers: from_pretrained(src).save_pretrained(dst, "
                "safe_serialization=True))"
            )
        raise InputError(f"no safetensors weights found in {self.folder}")

    def _load_header(self, rel: str, path: Path) -> Header:
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                n = read_header_length(fh.read(8), size)
                raw = fh.read(n)
            header = parse_header(raw)
        except UnknownDtypeError as exc:
            raise UnsupportedError(f"shard {path}: {exc}") from None
        except HeaderError as exc:
            raise InputError(f"shard {path} has a corrupt header: {exc}") from None
        except OSError as exc:
            raise InputError(f"cannot read shard {path}: {exc.strerror or exc}") from None
        need = header.data_start + header.data_end
        if size < need:
            raise InputError(f"shard {path} is truncated: {size} bytes, header needs {need}")
        self._fp.update(f"\0shard\0{rel}\0{size}\0".encode())
        self._fp.update(n.to_bytes(8, "little") + raw)
        self._header_sha[path] = hashlib.sha256(n.to_bytes(8, "little") + raw).hexdigest()
        return header

    # -- public API -----------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names, sorted (a copy)."""
        return list(self._names)

    @property
    def total_bytes(self) -> int:
        """Sum of the data sizes of all listed tensors, in bytes."""
        return sum(e.spec.nbytes for _, e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def _entry(self, name: str) -> tuple[Path, TensorEntry]:
        try:
            return self._entries[name]
        except KeyError:
            raise InputError(f"tensor {name!r} is not in checkpoint {self.folder}") from None

    @property
    def files(self) -> list[Path]:
        """The shard files of the checkpoint (paths inside the folder), sorted."""
        return sorted(self._headers, key=str)

    def spec(self, name: str) -> TensorSpec:
        return self._entry(name)[1].spec

    def shard_of(self, name: str) -> Path:
        """Path of the shard file holding `name` (inside the checkpoint folder)."""
        return self._entry(name)[0]

    def shard_identities(self) -> list[dict[str, Any]]:
        """Per shard: name, size, sha256 of its header (length prefix + JSON) and, when the file is a Hugging Face
        cache blob (named by the sha256 of its content), that content hash; otherwise None (never computed here:
        that would read the whole checkpoint)."""
        out = []
        for path in self.files:
            real = path.resolve()
            content = real.name if _BLOB_NAME.match(real.name) and real.parent.name == "blobs" else None
            out.append({"file": path.name, "size": path.stat().st_size, "header_sha256": self._header_sha[path],
                        "content_sha256": content})
        return out

    def fingerprint(self) -> str:
        """sha256 hex over the index bytes and every shard's name, size and header bytes.

        A cheap content identity of the source (tensor data is not hashed)."""
        return self._fp.hexdigest()

    def _seek(self, name: str, offset: int = 0) -> tuple[BinaryIO, Path, TensorEntry]:
        """This thread's (cached) handle of `name`'s shard, positioned `offset` bytes into the tensor."""
        path, entry = self._entry(name)
        local = self._local
        try:
            if getattr(local, "path", None) != path:
                self._release(getattr(local, "fh", None))
                local.fh, local.path = None, None
                fh = open(path, "rb", buffering=0)
                with self._handles_lock:
                    self._handles.add(fh)
                local.fh, local.path = fh, path
            local.fh.seek(self._headers[path].data_start + entry.begin + offset)
        except OSError as exc:
            raise InputError(f"cannot read shard {path}: {exc.strerror or exc}") from None
        return local.fh, path, entry

    def _release(self, fh: BinaryIO | None) -> None:
        if fh is None:
            return
        with self._handles_lock:
            self._handles.discard(fh)
        fh.close()

    def _read_into(self, name: str, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Fill ``buf`` with the tensor's bytes starting ``offset`` bytes into its data."""
        fh, path, _ = self._seek(name, offset)
        view = memoryview(buf).cast("B")
        got = 0
        try:
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise InputError(f"shard {path} is truncated (changed while reading {name!r})")
                got += n
        except OSError as exc:
            raise InputError(f"cannot read {name!r} from shard {path}: {exc.strerror or exc}") from None

    def read_bytes(self, name: str) -> bytes:
        """The tensor's raw little-endian bytes exactly as stored (for byte-identical copies)."""
        fh, path, entry = self._seek(name)
        try:
            data = fh.read(entry.spec.nbytes)  # one copy; a short read is finished below
            if len(data) < entry.spec.nbytes:
                parts = [data]
                left = entry.spec.nbytes - len(data)
                while left and (more := fh.read(left)):
                    parts.append(more)
                    left -= len(more)
                data = b"".join(parts)
        except OSError as exc:
            raise InputError(f"cannot read {name!r} from shard {path}: {exc.strerror or exc}") from None
        if len(data) != entry.spec.nbytes:
            raise InputError(f"shard {path} is truncated (changed while reading {name!r})")
        return data

    def iter_bytes(self, name: str, buffer: bytearray) -> Iterator[memoryview]:
        """The tensor's raw bytes in pieces of at most ``len(buffer)``, each read into ``buffer``
        and valid until the next piece is asked for: a multi-GB embedding copies through a small,
        reused buffer (bounded memory, and no fresh pages to fault in for every tensor)."""
        total = self._entry(name)[1].spec.nbytes
        if not buffer:
            raise ValueError("iter_bytes needs a non-empty buffer")
        view = memoryview(buffer)
        offset = 0
        while offset < total:
            n = min(len(view), total - offset)
            self._read_into(name, view[:n], offset)
            yield view[:n]
            offset += n

    def read(self, name: str) -> torch.Tensor:
        """The tensor on CPU, contiguous, with its stored dtype and shape; owns its memory."""
        spec = self._entry(name)[1].spec
        dtype = to_torch_dtype(spec.dtype)
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=dtype)
        if sys.byteorder != "little" and spec.dtype not in ("BOOL", "U8", "I8"):
            raise InputError("transgqla needs a little-endian machine to read multi-byte tensors")
        buf = bytearray(spec.nbytes)
        self._read_into(name, buf)
        return torch.frombuffer(buf, dtype=dtype).reshape(spec.shape)

    def read_into(self, name: str, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Fill ``buf`` with the tensor's raw bytes from ``offset`` bytes into its data (a caller that
        reads the same shapes over and over reuses one buffer instead of fresh pages every time)."""
        nbytes = self._entry(name)[1].spec.nbytes
        if offset < 0 or offset + memoryview(buf).nbytes > nbytes:
            end = offset + memoryview(buf).nbytes
            raise ValueError(f"bytes [{offset}, {end}) are outside {name!r} ({nbytes} bytes)")
        self._read_into(name, buf, offset)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the tensor along its first dim (stored dtype, owns its memory):
        an embedding lookup or a vocabulary chunk of a head without reading the whole matrix."""
        spec = self._entry(name)[1].spec
        if not spec.shape or not 0 <= start <= stop <= spec.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are outside {name!r} of shape {list(spec.shape)}")
        dtype = to_torch_dtype(spec.dtype)
        shape = (stop - start, *spec.shape[1:])
        row = spec.nbytes // spec.shape[0]
        if row * (stop - start) == 0:
            return torch.empty(shape, dtype=dtype)
        if sys.byteorder != "little" and spec.dtype not in ("BOOL", "U8", "I8"):
            raise InputError("transgqla needs a little-endian machine to read multi-byte tensors")
        buf = bytearray(row * (stop - start))
        self._read_into(name, buf, row * start)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        with self._handles_lock:
            handles, self._handles = self._handles, set()
            self._local = threading.local()
        for fh in handles:
            fh.close()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
