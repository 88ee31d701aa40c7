"""Is a folder what its manifest says? The one comparison that ``verify`` reports and every export requires of
OUT before it writes.

A manifest (:data:`transgqla.format.MANIFEST`) lists every other file of a checkpoint or export with its sha256
and, since the one-run-per-OUT change, its size. A folder matches it when

* nothing under it is a symlink or a special file: a published folder must hold its own bytes, and a link can
  point anywhere (a password file, ``/dev/zero``) or be retargeted after the hashes were taken;
* every listed file is there with its size and sha256 (sizes are compared first: a cheap refusal);
* no other file is there (hidden entries and ``__pycache__`` aside, as loaders leave those).

What it does not prove: that the manifest itself is honest. A folder edited by hand together with its manifest
matches; ``verify``'s other checks (finiteness, the remote code against the installed package, the config
contract) look at the content.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .format import FORMAT_VERSION, MANIFEST
from .io import sha256_file

MAX_MANIFEST_BYTES = 64 << 20


@dataclass
class FolderReport:
    """What :func:`compare_manifest` found; ``error`` is set when there is no usable manifest."""

    files: int = 0
    links: list[str] = field(default_factory=list)  # symlinks under the folder (relative POSIX paths)
    special: list[str] = field(default_factory=list)  # FIFOs, devices, sockets
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # size or sha256 differs
    extra: list[str] = field(default_factory=list)  # present, not listed
    error: str | None = None
    doc: dict[str, Any] = field(default_factory=dict)  # the manifest document

    @property
    def entries_ok(self) -> bool:
        return not self.links and not self.special

    @property
    def ok(self) -> bool:
        return self.error is None and self.entries_ok and not (self.missing or self.changed or self.extra)

    def problems(self) -> list[str]:
        parts = []
        if self.links:
            parts.append("symlinks (refused): " + ", ".join(self.links))
        if self.special:
            parts.append("not regular files: " + ", ".join(self.special))
        if self.error:
            parts.append(self.error)
        if self.changed:
            parts.append("sha256 or size differs: " + ", ".join(self.changed))
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        if self.extra:
            parts.append("not in the manifest: " + ", ".join(self.extra))
        return parts


def _ignored(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def scan_entries(folder: Path, report: FolderReport) -> set[str]:
    """Regular files under ``folder`` (relative POSIX paths; hidden entries and __pycache__ not listed), links and
    special files recorded in ``report``. Never follows a link."""
    files: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(folder)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                report.links.append(rel.as_posix())
            elif stat.S_ISDIR(mode):
                continue
            elif not stat.S_ISREG(mode):
                report.special.append(rel.as_posix())
            elif not _ignored(rel):
                files.add(rel.as_posix())
    report.links.sort()
    report.special.sort()
    return files


def read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the manifest document, None) or (None, why it is not usable)."""
    path = Path(folder) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None, f"{MANIFEST} is missing: the files cannot be checked"
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        return None, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{MANIFEST} is not valid JSON: {exc}".splitlines()[0]
    files = doc.get("files") if isinstance(doc, dict) else None
    sizes = doc.get("sizes", {}) if isinstance(doc, dict) else None
    if (not isinstance(files, dict) or doc.get("format_version") != FORMAT_VERSION
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
            or not isinstance(sizes, dict)):
        return None, f"{MANIFEST} must hold format_version {FORMAT_VERSION} and a files object"
    return doc, None


def compare_manifest(folder: Path) -> FolderReport:
    """``folder`` against its manifest: entries, sizes, then sha256 (reads every listed file once)."""
    folder = Path(folder)
    report = FolderReport()
    present = scan_entries(folder, report) - {MANIFEST}
    doc, report.error = read_manifest(folder)
    if doc is None:
        return report
    report.doc = doc
    files, sizes = doc["files"], doc.get("sizes", {})
    report.files = len(files)
    for rel, digest in sorted(files.items()):
        if rel not in present:
            report.missing.append(rel)
            continue
        size = sizes.get(rel)
        if isinstance(size, int) and (folder / rel).stat().st_size != size:
            report.changed.append(rel)
        elif sha256_file(folder / rel) != digest:
            report.changed.append(rel)
    report.extra = sorted(present - set(files))
    return report


def require_manifest(folder: Path, what: str = "OUT") -> FolderReport:
    """:func:`compare_manifest`, or one InputError line saying how ``folder`` differs from its manifest."""
    report = compare_manifest(folder)
    if not report.ok:
        listed = "; ".join(report.problems())
        raise InputError(f"{what} {folder} does not match its {MANIFEST} ({listed[:400]}); it was changed after it "
                         "was written: convert it again, or see transgqla verify")
    return report
