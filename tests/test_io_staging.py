"""io/staging.py on its own: what open_staged_run keeps from an interrupted run, and what it refuses or discards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from transgqla.errors import OutputError
from transgqla.io.staging import MARKER, PROGRESS, open_staged_run, staging_path

SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


def _open(out: Path, fingerprint: str = "plan-a", **kw):
    args = dict(fingerprint=fingerprint, shard_files=SHARDS, output_bytes=1000, force=False, resume=True,
                protect=[], reuse_layers=range(4))
    args.update(kw)
    return open_staged_run(out, **args)


def _interrupted_run(out: Path):
    """A run that finished two shards and recorded three layer reports, then stopped."""
    run = _open(out, resume=False)
    for name in SHARDS[:2]:
        data = name.encode() * 10
        (run.path / name).write_bytes(data)
        run.layers[len(run.layers)] = {"error": 0.5}
        run.shard_done(name, hashlib.sha256(data).hexdigest())
    run.layers[7] = {"error": 0.1}  # beyond the layers a later run may reuse
    (run.path / (SHARDS[2] + ".partial")).write_bytes(b"half")
    (run.path / "stray.tmp").write_bytes(b"x")
    run.journal.save()
    return run


def test_a_fresh_run_is_marked_and_journaled(tmp_path):
    run = _open(tmp_path / "out", resume=False)
    assert run.path == staging_path(tmp_path / "out") and (run.path / MARKER).is_file()
    assert json.loads((run.path / PROGRESS).read_text())["plan"] == "plan-a"
    assert run.resume_info is None and not run.kept.continued


def test_a_resumed_run_keeps_verified_shards_and_reusable_reports_only(tmp_path):
    out = tmp_path / "out"
    _interrupted_run(out)
    (staging_path(out) / SHARDS[1]).write_bytes(b"changed since")  # no longer what the journal recorded
    run = _open(out)
    assert run.kept.continued and list(run.kept.shards) == [SHARDS[0]]
    assert sorted(run.layers) == [0, 1]  # layer 7 is outside reuse_layers
    assert sorted(p.name for p in run.path.iterdir()) == sorted([MARKER, PROGRESS, SHARDS[0]])
    assert run.resume_info == {"staging": str(run.path), "continued": True, "shards_kept": 1, "shards_total": 3,
                               "note": f"resumed from {run.path}: 1 of 3 shards kept"}
    run.close()
    assert _open(out, reuse_layers=range(0)).layers == {}  # a calibrated run recomputes every layer


def test_another_plan_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    _interrupted_run(out)
    with pytest.raises(OutputError, match="another source or with other settings"):
        _open(out, fingerprint="plan-b")
    assert (staging_path(out) / SHARDS[0]).is_file()  # refused before anything was removed
    run = _open(out, fingerprint="plan-b", force=True)
    assert not run.kept.continued and "discarded (--force)" in run.kept.note
    assert sorted(p.name for p in run.path.iterdir()) == [MARKER, PROGRESS]


def test_an_unreadable_journal_starts_fresh(tmp_path):
    out = tmp_path / "out"
    _interrupted_run(out)
    (staging_path(out) / PROGRESS).write_text("{not json")
    run = _open(out)
    assert not run.kept.continued and "no usable progress journal" in run.kept.note
    assert sorted(p.name for p in run.path.iterdir()) == [MARKER, PROGRESS]


def test_commit_drops_the_journal_and_the_marker(tmp_path):
    out = tmp_path / "out"
    run = _open(out, resume=False)
    (run.path / "config.json").write_text("{}")
    run.finish()
    assert run.kept_on_disk
    assert run.commit() == out.absolute()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and not run.kept_on_disk
