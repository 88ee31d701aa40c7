"""Checkpoint IO: validated lazy safetensors reading, planned shard writing, staged output, Hub resolution.

Reading validates the whole checkpoint (index, paths, every shard header) before any tensor is read
(:mod:`.reader`); writing plans all shards up front so data streams one tensor at a time (:mod:`.writer`)
into a staged folder, one run per output (:mod:`.lock`), whose journal makes an interrupted run resumable
(:mod:`.staging`); a source named by
a Hugging Face id is found in the cache or downloaded (:mod:`.hub`). Nothing here knows a model.
"""

from transgqla.io.hub import ResolvedSource, resolve_source
from transgqla.io.lock import OutputLock
from transgqla.io.reader import SafetensorsCheckpoint
from transgqla.io.safetensors_format import TensorSpec
from transgqla.io.staging import StagedOutput, StagedRun, open_staged_run, staging_path
from transgqla.io.writer import (
    ShardedWriter,
    copy_file_hashed,
    copy_file_sized,
    ensure_free_space,
    plan_shards,
    sha256_file,
)

__all__ = [
    "OutputLock",
    "ResolvedSource",
    "SafetensorsCheckpoint",
    "ShardedWriter",
    "StagedOutput",
    "StagedRun",
    "TensorSpec",
    "copy_file_hashed",
    "copy_file_sized",
    "ensure_free_space",
    "open_staged_run",
    "plan_shards",
    "resolve_source",
    "sha256_file",
    "staging_path",
]
