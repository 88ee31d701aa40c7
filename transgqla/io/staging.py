"""The staged output folder and its resume journal, together: what an interrupted run leaves and a resumed
run keeps.

Why staged: a crash or an error must never leave something that looks like a finished checkpoint at OUT.
Work happens in ``<parent>/.<OUT>.transgqla-partial`` (marked by an ``INCOMPLETE`` file) and the folder is
renamed to OUT only when complete (:class:`StagedOutput`).

Why a journal: every shard is renamed into place once whole and fsynced (:mod:`.writer`), then recorded in
``transgqla-progress.json`` (rewritten atomically) with its sha256, the per-layer reports known so far and
the fingerprint of the plan that produced it. A resumed run whose plan fingerprint matches re-hashes the
recorded shards, keeps those that still match and writes the rest; since each shard's bytes are a pure
function of the plan, the result is bit-identical to an uninterrupted run. A journal from another plan is
an error unless forced (then the folder is started over); a missing or unreadable one starts fresh.

One call, :func:`open_staged_run`, takes OUT's lock (:mod:`.lock`: one run per OUT), checks the disk space
still needed, opens (or reuses) the folder, removes whatever the kept shards do not explain, and returns a
:class:`StagedRun`: the folder, what was kept (:class:`Kept`), and the hooks the writer calls as shards
complete. Its commit checks that every file the caller lists is in place with its size before the rename.
The caller knows nothing of the journal's file format; this module knows nothing of models (a layer is an
index with a report).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transgqla.errors import OutputError
from transgqla.io.lock import OutputLock
from transgqla.io.writer import ensure_free_space, fsync_dir, guard_write, sha256_file, write_file_atomic

MARKER = "INCOMPLETE"
PROGRESS = "transgqla-progress.json"  # the resume journal inside the staging folder
JOURNAL_VERSION = 1

__all__ = ["JOURNAL_VERSION", "MARKER", "PROGRESS", "Kept", "StagedOutput", "StagedRun", "open_staged_run",
           "staging_path"]



def staging_path(out: Path) -> Path:
    """Where `StagedOutput` builds OUT: `<parent>/.<name>.transgqla-partial`."""
    out = Path(out).expanduser().absolute()
    return out.parent / f".{out.name}.transgqla-partial"


def _within(a: Path, b: Path) -> bool:
    """a == b or a inside b (both already resolved)."""
    return a == b or a.is_relative_to(b)


class StagedOutput:
    """Atomic output folder: build in `<parent>/.<name>.transgqla-partial`, rename on commit.

    Usage: `with StagedOutput(out, force, protect=[src], command="export") as st: ...write into st.path...;
    st.commit(sizes)`. OUT's lock (:mod:`.lock`) is taken first and held until commit or close, so a second
    run into the same OUT is refused before it touches anything. Leaving the block without `commit()`
    (exception or not) keeps the staging folder, marked with an `INCOMPLETE` file, for a later resume; OUT
    is untouched. A `.<name>.transgqla-old` left by a run killed inside a forced commit is cleaned up here:
    removed when OUT is in place, renamed back to OUT when the kill fell between the two renames.
    """

    def __init__(self, out: Path, force: bool, protect: list[Path] | None = None, resume: bool = False, *,
                 command: str = "write", lock: OutputLock | None = None) -> None:
        self.out = Path(out).expanduser().absolute()
        self.force = force
        self.staging = staging_path(self.out)
        self._old = self.out.parent / f".{self.out.name}.transgqla-old"
        self.committed = False
        self.notes: list[str] = []
        self.lock = lock if lock is not None else OutputLock(self.out, command)
        try:
            self._check(protect or [])  # what no other run can change: before the lock, so it is said first
            self.lock.acquire()
            self._recover_old()
            self._check_not_empty()
            self._prepare(resume)
        except BaseException:
            self.close()
            raise

    def _check(self, protect: list[Path]) -> None:
        if self.out.is_symlink():
            raise OutputError(f"output {self.out} is a symbolic link (to {os.readlink(self.out)}); pass the folder "
                              "itself")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output {self.out} is a file, not a folder")
        target = self.out.resolve()
        for p in protect:
            src = Path(p).expanduser().resolve()
            if _within(target, src) or _within(src, target):
                raise OutputError(f"output folder {self.out} overlaps the source {src}; choose another")
        for keep in (Path.cwd().resolve(), Path.home().resolve()):
            if self.force and self.out.is_dir() and any(self.out.iterdir()) and _within(keep, target):
                raise OutputError(f"refusing to replace {self.out}: it contains {keep}")
        if self.staging.is_symlink() or (self.staging.exists() and not self.staging.is_dir()):
            raise OutputError(f"staging path {self.staging} exists and is not a folder; remove it")

    def _check_not_empty(self) -> None:
        if self.out.is_dir() and any(self.out.iterdir()) and not self.force:
            raise OutputError(f"output folder {self.out} is not empty; pass --force to replace it")

    def _recover_old(self) -> None:
        """What a run killed inside a forced commit left: the previous OUT under its hidden name."""
        old = self._old
        if not os.path.lexists(old):
            return
        if old.is_symlink() or not old.is_dir():
            guard_write(old, old.unlink)
        elif os.path.lexists(self.out):
            guard_write(old, lambda: shutil.rmtree(old))
            self.notes.append(f"removed {old}, the previous output left by an interrupted --force commit")
        else:
            guard_write(self.out, lambda: old.rename(self.out))
            self.notes.append(f"restored {self.out} from {old}, where an interrupted --force commit left it")

    def _prepare(self, resume: bool) -> None:
        if self.staging.exists() and not resume:
            guard_write(self.staging, lambda: shutil.rmtree(self.staging))
        guard_write(self.staging, lambda: self.staging.mkdir(parents=True, exist_ok=True))
        guard_write(self.staging / MARKER, lambda: (self.staging / MARKER).write_text(
            f"transgqla output in progress for {self.out}; not a usable checkpoint\n"))

    @property
    def path(self) -> Path:
        """The staging folder to write into."""
        return self.staging

    def check_complete(self, sizes: Mapping[str, int]) -> None:
        """OutputError unless every file of ``sizes`` (relative name -> bytes) is in the staging folder as a
        regular file of exactly that size: nothing is committed that its index or manifest would lie about."""
        for rel, size in sorted(sizes.items()):
            path = self.staging / rel
            try:
                st = os.lstat(path)
            except OSError:
                got = "is missing"
            else:
                if not stat.S_ISREG(st.st_mode):
                    got = "is not a regular file"
                elif st.st_size != size:
                    got = f"has {st.st_size} bytes, {size} were written"
                else:
                    continue
            raise OutputError(f"the staged output {self.staging} is incomplete: {rel} {got} (changed by another "
                              f"program?); {self.out} was not written")

    def commit(self, sizes: Mapping[str, int] | None = None) -> Path:
        """Check the written files (``sizes``), remove the marker and rename staging to OUT (replacing an old
        OUT if forced); then release OUT's lock."""
        if self.committed:
            return self.out
        if sizes is not None:
            self.check_complete(sizes)
        guard_write(self.staging / MARKER, lambda: (self.staging / MARKER).unlink(missing_ok=True))
        had_old = False
        if os.path.lexists(self.out):
            self._check_not_empty()
            if os.path.lexists(self._old):
                guard_write(self._old, lambda: shutil.rmtree(self._old))
            guard_write(self.out, lambda: self.out.rename(self._old))
            had_old = True
        try:
            self.staging.rename(self.out)
        except OSError as exc:
            if had_old:  # put the previous output back where it was
                self._old.rename(self.out)
            raise OutputError(f"cannot move {self.staging} to {self.out}: {exc.strerror or exc}") from None
        if had_old:
            guard_write(self._old, lambda: shutil.rmtree(self._old))
        fsync_dir(self.out.parent)
        self.committed = True
        self.close()
        return self.out

    def abort(self) -> None:
        """Leave the (marked) staging folder in place for inspection or resume; release OUT's lock."""
        self.close()

    def close(self) -> None:
        """Release OUT's lock (the folders stay as they are)."""
        self.lock.release()

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the journal ------------------------------------------------------------------------------------


@dataclass
class Kept:
    """What a run keeps from an earlier, interrupted one (nothing for a fresh run)."""

    continued: bool = False  # the staging folder is reused
    shards: dict[str, str] = field(default_factory=dict)  # shard file -> sha256, re-verified on disk
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer reports the earlier run recorded
    note: str = ""

    def to_dict(self, staging: Path, shards_total: int) -> dict[str, Any]:
        return {"staging": str(staging), "continued": self.continued, "shards_kept": len(self.shards),
                "shards_total": shards_total, "note": self.note}


def _environment_changes(recorded: Any, now: dict[str, Any]) -> list[str]:
    if not isinstance(recorded, dict):
        return ["not recorded"]
    return [f"{k} {recorded.get(k)} -> {now.get(k)}" for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)]


def inspect_staging(staging: Path, fingerprint: str, force: bool, shard_files: list[str],
                    environment: dict[str, Any] | None = None) -> Kept:
    """Decide what a resumed run can keep. Reads only; a journal of another plan, or of another numerical
    ``environment`` (torch, BLAS, CPU code path: other bits), is an error unless forced."""
    if not staging.is_dir() or staging.is_symlink():
        return Kept(note=f"no partial output at {staging}; started fresh")
    try:
        doc = json.loads((staging / PROGRESS).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
            raise ValueError("unknown journal version")
        plan_fp, shards, layers = doc["plan"], doc["shards"], doc["layers"]
        if not isinstance(shards, dict) or not isinstance(layers, dict):
            raise ValueError("bad journal")
        layer_reports = {int(k): dict(v) for k, v in layers.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return Kept(note=f"partial output at {staging} has no usable progress journal; started fresh")
    changed = _environment_changes(doc.get("environment"), environment) if environment is not None else []
    if changed and plan_fp != fingerprint and "not recorded" not in changed:
        if force:
            return Kept(note=f"partial output at {staging} was computed in another environment; discarded (--force)")
        raise OutputError(
            f"the partial output in {staging} was computed with another numerical environment "
            f"({'; '.join(changed)}), which gives other bits: resuming would mix two; rerun without --resume to "
            "start over (or with --force)")
    if plan_fp != fingerprint:
        if force:
            return Kept(note=f"partial output at {staging} was for another source or settings; discarded (--force)")
        raise OutputError(
            f"the partial output in {staging} was made from another source or with other settings; "
            "rerun without --resume to start over (or with --force)"
        )
    completed = {}
    for name, digest in shards.items():
        if name in shard_files and (staging / name).is_file() and sha256_file(staging / name) == digest:
            completed[name] = digest
    return Kept(True, completed, layer_reports,
                f"resumed from {staging}: {len(completed)} of {len(shard_files)} shards kept")


class Journal:
    """``transgqla-progress.json`` in the staging folder, rewritten atomically after every shard.

    ``shards`` and ``layers`` are live: the run adds to them and :meth:`save` writes what is known."""

    def __init__(self, folder: Path, fingerprint: str, shards: dict[str, str], layers: dict[int, dict[str, Any]],
                 environment: dict[str, Any] | None = None):
        self.path = folder / PROGRESS
        self.fingerprint, self.shards, self.layers = fingerprint, dict(shards), layers
        self.environment = environment

    def save(self) -> None:
        doc = {
            "version": JOURNAL_VERSION,
            "plan": self.fingerprint,
            "shards": dict(sorted(self.shards.items())),
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            "environment": self.environment,
        }
        write_file_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot remove {self.path}: {exc.strerror or exc}") from None


def clean_staging(staging: Path, keep: set[str]) -> None:
    """Remove everything in the staging folder except the files named in ``keep``."""
    try:
        for entry in staging.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise OutputError(f"cannot clean the partial output in {staging}: {exc.strerror or exc}") from None


# -- the one call -----------------------------------------------------------------------------------


@dataclass
class StagedRun:
    """One run's staged folder and its journal. Write into :attr:`path`; call :meth:`shard_done` as each
    shard completes; :meth:`commit` when everything is written (the journal goes, OUT appears)."""

    staged: StagedOutput
    journal: Journal
    kept: Kept
    resume_info: dict[str, Any] | None  # what a --resume run found and reused (None: resume not asked)

    @property
    def path(self) -> Path:
        return self.staged.path

    @property
    def layers(self) -> dict[int, dict[str, Any]]:
        """Layer reports known so far (kept ones first); add to it, and the next journal save records them."""
        return self.journal.layers

    def shard_done(self, name: str, digest: str) -> None:
        self.journal.shards[name] = digest
        self.journal.save()

    def finish(self) -> None:
        """Everything is written: drop the journal (the folder is no longer resumable, just not yet OUT)."""
        self.journal.remove()

    def commit(self, sizes: Mapping[str, int] | None = None) -> Path:
        """Check that the files of ``sizes`` are in place, then rename to OUT and release the lock."""
        return self.staged.commit(sizes)

    def close(self) -> None:
        """Release OUT's lock (idempotent; the folder stays as it is)."""
        self.staged.close()

    def discard(self) -> None:
        """Bad input: nothing worth resuming; remove the staging folder."""
        shutil.rmtree(self.staged.path, ignore_errors=True)

    @property
    def kept_on_disk(self) -> bool:
        """The (marked) staging folder is still there for ``--resume`` (not committed, not removed)."""
        return not self.staged.committed and self.staged.path.is_dir()


def open_staged_run(out: Path, *, fingerprint: str, shard_files: list[str], output_bytes: int, force: bool,
                    resume: bool, protect: list[Path], reuse_layers: range = range(0),
                    command: str = "convert", environment: dict[str, Any] | None = None) -> StagedRun:
    """Lock OUT, then open its staging folder for a run of the plan ``fingerprint`` writing ``shard_files``.

    With ``resume``, what the journal of an interrupted run of the same plan proves is kept (shards whose
    sha256 still matches, the recorded reports of the layers in ``reuse_layers``); everything else in the
    folder is removed; a journal written in another numerical ``environment`` is refused by name. Checks first
    that the disk holds the ``output_bytes`` not already kept. The lock is held until :meth:`StagedRun.commit`
    or :meth:`StagedRun.close`."""
    staging = staging_path(out)
    lock = OutputLock(out, command).acquire()
    try:
        kept = inspect_staging(staging, fingerprint, force, shard_files, environment) if resume else Kept()
        kept_bytes = sum((staging / f).stat().st_size for f in kept.shards)
        ensure_free_space(staging, max(0, output_bytes - kept_bytes))
        staged = StagedOutput(out, force, protect=protect, resume=kept.continued, lock=lock)
        if kept.continued:
            clean_staging(staged.path, {MARKER, PROGRESS, *kept.shards})
        layers = {layer: r for layer, r in kept.layers.items() if layer in reuse_layers}
        journal = Journal(staged.path, fingerprint, kept.shards, layers, environment)
        journal.save()
    except BaseException:
        lock.release()
        raise
    info = kept.to_dict(staging, len(shard_files)) if resume else None
    return StagedRun(staged, journal, kept, info)
