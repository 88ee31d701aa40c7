"""The tokenizer and generation files an output carries: only the input folder's own files, only data.

Why: users load what transgqla writes with ``trust_remote_code=True`` (the GQLA runtime needs it), so anything
copied from a downloaded source travels with that trust. ``convert`` (from the source) and every export (from
OUT) therefore carry exactly this:

* the names of :data:`transgqla.format.COPIED_FILES`, an exact allow-list of data files; never code, so a
  source's ``tokenizer_evil.py`` stays behind (and the run says the source ships code);
* each file under the shard rule (:mod:`transgqla.io.source_files`): the folder's own regular file, never a link
  out of it, opened without following links;
* ``tokenizer_config.json`` without ``auto_map`` (:data:`transgqla.format.CODE_POINTERS`): it names classes
  in code files the source ships, and transformers imports them when the tokenizer is loaded with
  ``trust_remote_code=True``. The file is rewritten without the key and the run says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .format import CODE_POINTERS, COPIED_FILES
from .io.source_files import checked_path, copy_checked, read_checked
from .io.writer import write_file_atomic

#: The most a rewritten JSON file may hold (tokenizer configs are kilobytes; a chat template a few hundred).
MAX_REWRITTEN_BYTES = 64 << 20


@dataclass
class DataFile:
    name: str
    nbytes: int
    content: bytes | None = None  # the rewritten bytes, or None: copied byte for byte when written


@dataclass
class DataFiles:
    """What :func:`write_data_files` will write, found and checked by :func:`find_data_files`."""

    folder: Path
    files: list[DataFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was dropped, for the run's summary

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def _without_code_pointers(folder: Path, name: str, keys: tuple[str, ...], notes: list[str]) -> bytes | None:
    """The file's JSON without ``keys`` (None when it holds none of them, or is not a JSON object)."""
    raw = read_checked(folder, name, MAX_REWRITTEN_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # not JSON: no loader reads a class name out of it
    if not isinstance(doc, dict) or not any(k in doc for k in keys):
        return None
    dropped = {k: doc.pop(k) for k in keys if k in doc}
    what = "; ".join(f"{k} = {json.dumps(v, sort_keys=True)}"[:200] for k, v in dropped.items())
    notes.append(f"dropped {', '.join(dropped)} from {name}: it points at code shipped with the input ({what}), "
                 "which is not copied; the tokenizer loads without it")
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def find_data_files(folder: Path, own_code: tuple[str, ...] = ()) -> DataFiles:
    """The allow-listed data files of ``folder``, each checked under the shard rule (InputError otherwise).
    ``own_code``: code files the folder is known to carry (OUT's remote code), not worth a note."""
    folder = Path(folder)
    found = DataFiles(folder)
    code = sorted(p.name for p in folder.iterdir() if p.name.endswith(".py") and p.name not in own_code)
    if code:
        found.notes.append(f"{folder} ships code ({', '.join(code[:5])}{', ...' if len(code) > 5 else ''}); "
                           "it is not copied: only data files travel")
    for name in COPIED_FILES:
        if not (folder / name).is_symlink() and not (folder / name).exists():
            continue
        real = checked_path(folder, name)
        keys = CODE_POINTERS.get(name, ())
        content = _without_code_pointers(folder, name, keys, found.notes) if keys else None
        found.files.append(DataFile(name, len(content) if content is not None else real.stat().st_size, content))
    return found


def write_data_files(data: DataFiles, dst: Path, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Write the files into ``dst``: copied under the shard rule, or the rewritten bytes. Returns
    ``{name: sha256}``; records each file's bytes in ``sizes`` when given."""
    hashes = {}
    for f in data.files:
        if f.content is None:
            hashes[f.name], size = copy_checked(data.folder, f.name, dst / f.name)
        else:
            write_file_atomic(dst / f.name, f.content)
            hashes[f.name], size = hashlib.sha256(f.content).hexdigest(), len(f.content)
        if sizes is not None:
            sizes[f.name] = size
    return hashes
