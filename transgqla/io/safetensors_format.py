"""Minimal safetensors header codec (our own; no dependency on the `safetensors` package).

File layout: 8-byte little-endian u64 N, then N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`
padded with spaces to a multiple of 8, then the data region. Offsets are relative to
the start of the data region (byte 8 + N). Tensor bytes are little-endian, C order.

Parsing only touches the header bytes, so validating a 10 GB shard costs one small read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import torch

#: Refuse headers larger than this (the reference implementation uses the same cap).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype string -> (torch dtype, itemsize in bytes).
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "U16": (torch.uint16, 2),
    "I16": (torch.int16, 2),
    "U32": (torch.uint32, 4),
    "I32": (torch.int32, 4),
    "U64": (torch.uint64, 8),
    "I64": (torch.int64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "C64": (torch.complex64, 8),
}
_TORCH_TO_ST: dict[torch.dtype, str] = {t: s for s, (t, _) in _DTYPES.items()}


class HeaderError(ValueError):
    """A header violates the format; callers turn it into a user-facing error naming the file."""


class UnknownDtypeError(HeaderError):
    """A well-formed header uses a dtype this codec does not know (e.g. a newer float format)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype string and shape of one tensor (no data)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor as found in a shard header: spec plus [begin, end) in the data region."""

    spec: TensorSpec
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A parsed shard header. `data_start` = 8 + N, the absolute offset of the data region."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    data_end: int  # largest `end` offset (relative to data_start); 0 when no tensors


def is_known_dtype(dtype: str) -> bool:
    return dtype in _DTYPES


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string (KeyError if unknown)."""
    return _DTYPES[dtype][1]


def to_torch_dtype(dtype: str) -> torch.dtype:
    """safetensors dtype string -> torch dtype (KeyError if unknown)."""
    return _DTYPES[dtype][0]


def from_torch_dtype(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype string (KeyError if not representable)."""
    return _TORCH_TO_ST[dtype]


def spec_of(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The TensorSpec describing `tensor` stored under `name`."""
    return TensorSpec(name, from_torch_dtype(tensor.dtype), tuple(int(d) for d in tensor.shape))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str | bytes) -> Any:
    """json.loads that rejects duplicate object keys (they would silently shadow tensors)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def read_header_length(prefix: bytes, file_size: int) -> int:
    """Decode and sanity-check N from the first 8 bytes of a file of `file_size` bytes."""
    if len(prefix) < 8:
        raise HeaderError(f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise HeaderError(f"absurd header length {n}")
    if 8 + n > file_size:
        raise HeaderError(f"header length {n} exceeds the file size {file_size}")
    return n


def parse_header(raw: bytes) -> Header:
    """Validate the N header bytes (without the 8-byte prefix) and return the parsed Header.

    Checks: UTF-8 JSON object, known dtypes, non-negative integer shapes, offsets
    consistent with shape x itemsize, and non-overlapping data ranges. The caller
    checks the file is long enough (`8 + N + data_end`).
    """
    try:
        obj = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise HeaderError("__metadata__ is not a {str: str} object")
    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise HeaderError(f"tensor {name!r}: entry is not an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise HeaderError(f"tensor {name!r}: bad dtype {dtype!r}")
        if dtype not in _DTYPES:
            raise UnknownDtypeError(f"tensor {name!r} has dtype {dtype!r}, which transgqla does not support")
        if not isinstance(shape, list) or not all(
            type(d) is int and d >= 0 for d in shape
        ):
            raise HeaderError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise HeaderError(f"tensor {name!r}: bad data_offsets {offs!r}")
        spec = TensorSpec(name, dtype, tuple(shape))
        if offs[1] - offs[0] != spec.nbytes:
            raise HeaderError(
                f"tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes "
                f"but {dtype}{list(shape)} needs {spec.nbytes}"
            )
        entries[name] = TensorEntry(spec, offs[0], offs[1])
    last_end, last_name = 0, None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < last_end:
            raise HeaderError(f"tensors {last_name!r} and {e.spec.name!r} overlap")
        if e.end > last_end:
            last_end, last_name = e.end, e.spec.name
    return Header(entries, dict(meta), 8 + len(raw), last_end)


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """Full header (8-byte length + JSON padded to a multiple of 8) for tensors laid out
    back to back in the given order. Deterministic: sorted keys, compact separators."""
    obj: dict[str, Any] = {}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPES:
            raise ValueError(f"unknown safetensors dtype {spec.dtype!r} for {spec.name!r}")
        if spec.name in obj or spec.name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {spec.name!r}")
        obj[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    if metadata:
        obj["__metadata__"] = dict(metadata)
    body = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
