"""Calibration and evaluation text -> token windows ``[n, seqlen]``.

Text comes from files (plain text, or JSONL with a ``text`` field) or from the built-in offline texts:
``builtin:calib``, ``builtin:eval`` (CPython's own documentation, :mod:`transgqla.texts`) and
``builtin:prose-calib``, ``builtin:prose-eval`` (general English from Debian's fortunes,
:mod:`transgqla.prose`). It is
tokenized with the source's ``tokenizer.json`` (the ``tokenizers`` package), without special tokens,
as one stream cut into non-overlapping windows of ``seqlen`` tokens; a short tail is dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import InputError

BUILTIN = "builtin:"


def read_text(sources: list[str]) -> str:
    """Concatenate the texts of ``sources`` (paths or ``builtin:NAME``), separated by blank lines."""
    parts = []
    for src in sources:
        if src.startswith(BUILTIN):
            from ..texts import builtin_text

            parts.append(builtin_text(src[len(BUILTIN):]))
            continue
        path = Path(src)
        if not path.is_file():
            raise InputError(f"text file {src} does not exist")
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    parts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{src}:{n}: expected a JSON object with a 'text' field") from None
        else:
            parts.append(raw)
    text = "\n\n".join(p for p in parts if p.strip())
    if not text:
        raise InputError(f"no text found in {', '.join(sources)}")
    return text


def load_tokenizer(model_folder: Path):
    """The source's fast tokenizer (``tokenizer.json``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("calibration needs the 'tokenizers' package: pip install tokenizers") from None
    path = Path(model_folder) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_folder} has no tokenizer.json; calibration and perplexity need it")
    return Tokenizer.from_file(str(path))


def token_windows(text: str, tokenizer, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` (int64) of the token stream, at most ``max_tokens`` tokens."""
    if seqlen < 2:
        raise InputError(f"sequence length must be at least 2, got {seqlen}")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise InputError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)


def windows_record(windows: torch.Tensor, sources: list[str]) -> dict:
    """What reproduces a calibration: where the text came from and the sha256 of the token windows
    (int64, row-major), recorded in ``config.gqla.conversion.calibration``."""
    digest = hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"text_sources": list(sources), "windows_sha256": digest, "windows": list(windows.shape),
            "tokens": int(windows.numel())}
