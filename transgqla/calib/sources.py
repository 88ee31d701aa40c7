"""Calibration sources -> token windows ``[n, seqlen]``: text, a cached Hugging Face dataset, the model itself.

Why: calibration tuned to one narrow text is tuned to that text. A conversion can calibrate on

* text files and the built-in texts (:mod:`transgqla.text`, the one text pipeline);
* ``hf:REPO[:CONFIG[:SPLIT]]``: a text dataset (``.parquet`` with pyarrow, ``.jsonl``/``.json`` or
  ``.txt`` files, a ``text`` field) read from huggingface_hub's local cache. Nothing is downloaded
  here: a dataset that is not cached is one clear error (fetch it once with
  ``huggingface-cli download --repo-type dataset REPO``);
* ``self``: text the source model writes itself (:mod:`transgqla.calib.self_text`): seeded sampling
  from short, varied prompts, streamed layer by layer. Domain-general and offline, but it costs one
  forward of the source per generated token: seconds to minutes for the demo on a CPU, a GPU's job at 8B.

Several sources mix: the token budget is split evenly and their windows are interleaved (round
robin), so that every source is seen by the sample windows and by refinement's held-out window.
``auto`` picks the most general source available offline and says which on stderr (see
:func:`resolve_auto`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError
from ..text.pipeline import check_sources, load_tokenizer, source_windows, stream_ids
from ..text.pipeline import ids_windows as token_windows_of
from ..text.reading import file_parts, joined
from .self_text import SEED as SELF_SEED
from .self_text import self_generated

SELF, HF, AUTO = "self", "hf:", "auto"
# Dataset repositories tried by ``auto``, most general first, when they sit in the local hub cache.
MAX_JSON_BYTES = 256 << 20  # a whole-file .json dataset is read at once
GENERAL_DATASETS = ("hf:Salesforce/wikitext:wikitext-103-raw-v1:train",
                    "hf:Salesforce/wikitext:wikitext-2-raw-v1:train", "hf:allenai/c4:en:train")


@dataclass
class CalibrationSet:
    windows: torch.Tensor  # [n, seqlen] int64, sources interleaved
    sources: list[str]  # what each source resolved to, in order


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len(HF):].split(":")
    if not parts[0] or "/" not in parts[0] or len(parts) > 3:
        raise InputError(f"--calib {spec}: expected hf:OWNER/NAME[:CONFIG[:SPLIT]]")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def cached_dataset(repo: str) -> Path | None:
    """The local snapshot folder of dataset ``repo`` in huggingface_hub's cache, or None if not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _split_files(root: Path, config: str | None, split: str) -> list[Path]:
    """Data files of ``split`` (``split.jsonl``, ``split-00000-of-00002.parquet``, ``split/*``), under
    ``config/`` when given, in name order."""
    kinds = (".parquet", ".jsonl", ".json", ".txt")
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix not in kinds:
            continue
        rel = path.relative_to(root).parts
        if config is not None and config not in rel[:-1]:
            continue
        if path.stem == split or path.stem.startswith(f"{split}-") or split in rel[:-1]:
            found.append(path)
    return found


def _file_parts(path: Path) -> Iterator[Iterator[str]]:
    """A dataset file's texts as parts (one per record, stripped; a ``.txt`` file whole), read in bounded
    memory: parquet batch by batch, ``.jsonl`` and ``.txt`` through the text reader."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path.name} is a parquet file: reading it needs pyarrow (pip install pyarrow)") from None
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise InputError(f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(batch_size=1024, columns=["text"]):
            for t in batch.column(0).to_pylist():
                if t and str(t).strip():
                    yield iter((str(t).strip(),))
        return
    if path.suffix in (".txt", ".jsonl"):
        for part in file_parts(path, "--calib"):
            if path.suffix == ".txt":
                yield part
            else:
                yield iter(("".join(part).strip(),))
        return
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(f"{path}: a .json dataset file over {MAX_JSON_BYTES >> 20} MiB; use its .jsonl or "
                         "parquet form")
    try:
        rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        for r in rows:
            if r["text"] and str(r["text"]).strip():
                yield iter((str(r["text"]).strip(),))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path}: expected JSON records with a 'text' field") from None


def hf_parts(spec: str) -> Iterator[Iterator[str]]:
    """The texts of a cached ``hf:REPO[:CONFIG[:SPLIT]]`` dataset, streamed; one-line errors when it is not
    usable (checked before the first text is read)."""
    repo, config, split = _parse_hf(spec)
    root = cached_dataset(repo)
    if root is None:
        raise InputError(f"dataset {repo} is not in the local Hugging Face cache and calibration never downloads: "
                         f"run 'huggingface-cli download --repo-type dataset {repo}' first (or pass a text file)")
    files = _split_files(root, config, split)
    if not files:
        raise InputError(f"dataset {repo} (cached at {root}) has no data files for config {config or '(any)'} "
                         f"split {split}")
    for f in files:
        yield from _file_parts(f)


def hf_text(spec: str) -> str:
    """The whole text of a cached dataset (small ones; calibration streams :func:`hf_parts`)."""
    text = "".join(joined(hf_parts(spec)))
    if not text:
        raise InputError(f"dataset {spec[len(HF):]}: the split holds no text")
    return text


def resolve_auto(model_folder: Path) -> list[str] | None:
    """``auto``: a cached general dataset (:data:`GENERAL_DATASETS`), else the built-in prose and
    documentation texts mixed (documentation alone where Debian's fortunes are missing); None (data-free)
    when the source has no tokenizer. Says which on stderr."""
    if not (Path(model_folder) / "tokenizer.json").is_file():
        return None
    for spec in GENERAL_DATASETS:
        repo, config, split = _parse_hf(spec)
        root = cached_dataset(repo)
        if root is not None and _split_files(root, config, split):
            chosen = [spec]
            break
    else:
        from ..text.prose import fortune_folder

        chosen = ["builtin:prose-calib", "builtin:calib"] if fortune_folder().is_dir() else ["builtin:calib"]
    hint = "" if chosen[0].startswith(HF) else " (--calib self, the model's own text, holds better on other text)"
    print(f"transgqla: --calib auto: calibrating on {' + '.join(chosen)}{hint}", file=sys.stderr)
    return chosen


def calibration_windows(specs: list[str], model_folder: Path, seqlen: int, tokens: int, device: str = "cpu",
                        seed: int = SELF_SEED) -> CalibrationSet:
    """Windows of every source in ``specs`` (``tokens // len(specs)`` tokens each, at least one window),
    interleaved round robin."""
    check_sources([s for s in specs if s != SELF and not s.startswith(HF)], "--calib")  # before any work
    share = max(seqlen, tokens // len(specs))
    per_source, names = [], []
    tok = None
    for spec in specs:
        if spec == SELF:
            per_source.append(self_generated(model_folder, max(1, share // seqlen), seqlen, seed, device))
            names.append(f"self:seed={seed}")
            continue
        tok = tok or load_tokenizer(model_folder)
        if spec.startswith(HF):
            ids = stream_ids(joined(hf_parts(spec)), tok, share)
            if ids.numel() == 0:
                raise InputError(f"dataset {spec[len(HF):]}: the split holds no text")
            per_source.append(token_windows_of(ids, seqlen))
        else:  # read and tokenized in chunks until the share is met: memory flat in the file's size
            per_source.append(source_windows([spec], tok, seqlen, share, flag="--calib"))
        names.append(spec)
    rows = [w for i in range(max(len(p) for p in per_source)) for p in per_source if i < len(p) for w in [p[i]]]
    return CalibrationSet(torch.stack(rows), names)
