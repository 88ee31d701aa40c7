"""Where a source checkpoint lives: a local folder as is, or a Hugging Face model id from the Hub (or its cache).

Why its own room: resolution is the one place that talks to the network; everything after it reads a local
folder. Failures are one-line :class:`~transgqla.errors.InputError` s (not found, gated, no such revision,
offline and not cached); a Hub that cannot be reached falls back to the local cache. The identity returned
(id, revision, snapshot commit, offline or not) is recorded in the output's provenance.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transgqla.errors import InputError

__all__ = ["HUB_ALLOW_PATTERNS", "ResolvedSource", "resolve_source"]

#: Files conversion needs from a Hub repo: configs, weights, tokenizer assets by exact name; never code (a
#: ``tokenizer*`` pattern would fetch a repository's ``tokenizer_*.py``).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "chat_template.jinja"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ResolvedSource:
    """Where the checkpoint lives locally, and how it was obtained (for provenance)."""

    path: Path
    identity: dict[str, Any] = field(default_factory=dict)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_cache_dir() -> str | None:
    """Honour HF_HUB_CACHE / HF_HOME as set now (huggingface_hub reads them at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def resolve_source(src: str, revision: str | None = None) -> ResolvedSource:
    """A local folder as is, else a Hugging Face model id fetched (or found in the cache).

    Offline (HF_HUB_OFFLINE=1) or on a network failure, only the local cache is used.
    """
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(f"source {src} is a file; pass the checkpoint folder")
        return ResolvedSource(local.resolve(), {"source": src, "revision": revision, "local": True})
    if not _REPO_ID.match(src) or ".." in src or src.endswith((".", "-")):
        raise InputError(f"source folder {src} does not exist (and is not a Hugging Face model id)")
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise InputError(f"source folder {src} does not exist and huggingface_hub is not installed") from None

    kwargs: dict[str, Any] = dict(
        revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=_hf_cache_dir()
    )
    offline = _env_true("HF_HUB_OFFLINE") or bool(getattr(constants, "HF_HUB_OFFLINE", False))
    rev = f"@{revision}" if revision else ""

    def _authoritative(exc: BaseException) -> InputError | None:
        """The Hub's definite answers (no point retrying from the cache)."""
        if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
            return InputError(f"model '{src}' has no revision '{revision}'")
        if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
            return InputError(f"model '{src}' is gated; accept its license and log in (hf auth login)")
        if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
            return InputError(f"model '{src}' not found on the Hugging Face Hub (or it is private)")
        if isinstance(exc, getattr(hf_errors, "HFValidationError", ())):
            return InputError(f"'{src}' is not a valid Hugging Face model id")
        return None

    try:
        path = snapshot_download(src, local_files_only=offline, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any hub failure is a user-facing input error
        definite = _authoritative(exc)
        if definite is not None:
            raise definite from None
        if offline:
            raise InputError(
                f"cannot resolve model '{src}{rev}' offline: not in the Hugging Face cache"
            ) from None
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        try:  # Hub unreachable or failing: fall back to whatever the cache holds
            path = snapshot_download(src, local_files_only=True, **kwargs)
            offline = True
        except Exception:  # noqa: BLE001
            raise InputError(
                f"cannot download model '{src}{rev}' ({first}) and it is not in the Hugging Face cache"
            ) from None
    snapshot = Path(path).resolve()
    return ResolvedSource(
        snapshot,
        {
            "source": src,
            "revision": revision,
            "commit": snapshot.name,
            "local": False,
            "offline": offline,
            "huggingface_hub": getattr(huggingface_hub, "__version__", None),
        },
    )
