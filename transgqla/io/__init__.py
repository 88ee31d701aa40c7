"""Checkpoint IO: validated lazy safetensors reading, planned shard writing, staged output.

Reading validates the whole checkpoint (index, paths, every shard header) before any
tensor is read; writing plans all shards up front so data streams one tensor at a time.
"""

from transgqla.io.reader import ResolvedSource, SafetensorsCheckpoint, resolve_source
from transgqla.io.safetensors_format import TensorSpec
from transgqla.io.writer import (
    ShardedWriter,
    StagedOutput,
    copy_file_hashed,
    ensure_free_space,
    plan_shards,
    sha256_file,
)

__all__ = [
    "ResolvedSource",
    "SafetensorsCheckpoint",
    "ShardedWriter",
    "StagedOutput",
    "TensorSpec",
    "copy_file_hashed",
    "ensure_free_space",
    "plan_shards",
    "resolve_source",
    "sha256_file",
]
