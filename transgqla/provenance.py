"""What a conversion's bits depend on besides its source and settings: the numerical environment, and the
source shards' identities.

Why: LAPACK's eigh and torch's reductions give different bits under another torch release, another BLAS/LAPACK
library or version, or another CPU code path (AVX2 against AVX-512). A resumed run keeps the shards an earlier
run wrote, so a resume across such a change would publish a checkpoint that no single run produces. The
environment is therefore recorded in the output (``config.gqla.conversion.environment``) and in the resume
journal, and a resume across a change is refused, naming what changed (:mod:`transgqla.io.staging`).

Source shards are identified by their header's sha256 and, where the source was already hashed (a Hugging Face
cache snapshot, whose files are links to blobs named by the sha256 of their content), by that content hash
(:meth:`transgqla.io.SafetensorsCheckpoint.shard_identities`). A local folder's tensor data is not hashed: a
change that keeps every header, size and modification time goes unseen (README, failure safety).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def _build() -> dict[str, str | None]:
    show = torch.__config__.show()
    found = {key.lower(): (m.group(1) if (m := re.search(rf"{key}=([^,\s]+)", show)) else None)
             for key in ("BLAS_INFO", "LAPACK_INFO")}
    try:
        info = torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001 - informational only
        info = ""
    library = next((line.strip() for line in info.splitlines() if "Math Kernel Library" in line or "BLAS" in line),
                   None)
    return {"blas": found["blas_info"], "lapack": found["lapack_info"], "blas_library": library}


def numerical_environment(device: str) -> dict[str, Any]:
    """torch's version, its BLAS/LAPACK build and library version, the CPU code path and the device type."""
    kind = torch.device(device).type
    env: dict[str, Any] = {"torch": torch.__version__, **_build(), "device": kind}
    try:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        env["cpu_capability"] = None
    if kind == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
