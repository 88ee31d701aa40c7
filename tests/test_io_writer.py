"""plan_shards, ShardedWriter (io/writer.py) and StagedOutput (io/staging.py), checked against the real
`safetensors` package."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from transgqla.errors import OutputError  # noqa: E402
from transgqla.io import writer as writer_mod  # noqa: E402
from transgqla.io.reader import SafetensorsCheckpoint  # noqa: E402
from transgqla.io.safetensors_format import TensorSpec, spec_of  # noqa: E402
from transgqla.io.staging import StagedOutput  # noqa: E402
from transgqla.io.writer import (  # noqa: E402
    ShardedWriter,
    copy_file_hashed,
    ensure_free_space,
    plan_shards,
    sha256_file,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),  # 128 B
        "b.weight": torch.randn(4, 8, generator=g),  # 128 B
        "c.ids": torch.arange(10, dtype=torch.int64),  # 80 B
        "d.big": torch.randn(64, 8, generator=g).to(torch.bfloat16),  # 1024 B
        "e.scalar": torch.tensor(2.0, dtype=torch.float16),  # 2 B
        "f.empty": torch.zeros(0, 3, dtype=torch.bfloat16),  # 0 B
    }


def _write(folder: Path, ts: dict[str, torch.Tensor], cap: int) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    specs = [spec_of(n, t) for n, t in ts.items()]
    w = ShardedWriter(folder, specs, cap, metadata={"converter": "transgqla-test"})
    for i, (name, t) in enumerate(ts.items()):
        # alternate tensors, non-contiguous tensors and raw bytes
        if i % 3 == 1 and t.dim() == 2:
            w.write(name, t.t().contiguous().t())  # same values, non-contiguous
        elif i % 3 == 2 and t.numel():
            w.write(name, t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            w.write(name, t)
    return w.close()


def test_plan_shards() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5, 1])]
    plan = plan_shards(specs, 80)  # 40, 40, 120, 20, 20, 4 bytes
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards([], 10) == []
    with pytest.raises(ValueError):
        plan_shards(specs, 0)


def test_written_checkpoint_loads_with_safetensors(tmp_path: Path) -> None:
    ts = _tensors()
    hashes = _write(tmp_path / "out", ts, cap=300)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(hashes)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    n = len(files) - 1
    assert n == 4  # [a, b] = 256 B; [c] (80 + 1024 > 300); [d] alone (over the cap); [e, f]
    shard_of = {k: int(v[6:11]) for k, v in index["weight_map"].items()}
    assert shard_of == {"a.weight": 1, "b.weight": 1, "c.ids": 2, "d.big": 3, "e.scalar": 4, "f.empty": 4}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    assert set(index["weight_map"]) == set(ts)
    loaded: dict[str, torch.Tensor] = {}
    for i in range(1, n + 1):
        shard = tmp_path / "out" / f"model-{i:05d}-of-{n:05d}.safetensors"
        part = safetensors_torch.load_file(shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 300 or len(part) == 1
        assert all(index["weight_map"][k] == shard.name for k in part)
        loaded.update(part)
    assert set(loaded) == set(ts)
    for name, ref in ts.items():
        assert loaded[name].dtype == ref.dtype and loaded[name].shape == ref.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))
    for name, digest in hashes.items():
        assert digest == hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
        assert digest == sha256_file(tmp_path / "out" / name)
    # our own reader round-trips it too (header metadata is valid safetensors)
    ck = SafetensorsCheckpoint(tmp_path / "out")
    assert all(torch.equal(ck.read(k), v) for k, v in ts.items())


def test_single_shard_still_has_index(tmp_path: Path) -> None:
    hashes = _write(tmp_path / "o", {"x": torch.ones(3)}, cap=1 << 30)
    assert sorted(hashes) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_deterministic_bytes(tmp_path: Path) -> None:
    h1 = _write(tmp_path / "one", _tensors(), cap=300)
    h2 = _write(tmp_path / "two", _tensors(), cap=300)
    assert h1 == h2
    for name in h1:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_write_contract_violations(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "BF16", (2, 2)), TensorSpec("b", "F32", (3,))]
    w = ShardedWriter(tmp_path, specs, 1 << 20)
    with pytest.raises(ValueError, match="out-of-order write: expected 'a', got 'b'"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(2, 2))  # float32, planned bf16
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(4, dtype=torch.bfloat16))  # wrong shape
    with pytest.raises(ValueError, match="planned 8"):
        w.write("a", b"\x00" * 7)
    w.write("a", torch.zeros(2, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not written"):
        w.close()
    w.write("b", memoryview(torch.zeros(3).numpy()))
    with pytest.raises(ValueError, match="not planned"):
        w.write("c", torch.zeros(1))
    w.close()
    with pytest.raises(ValueError):
        ShardedWriter(tmp_path, [specs[0], specs[0]], 10)


def test_streamed_copy_through_a_small_buffer_equals_the_whole_tensor_copy(tmp_path: Path) -> None:
    """The converter copies large tensors piecewise (``iter_bytes`` -> ``write_stream``)."""
    ts = _tensors()
    _write(tmp_path / "src", ts, cap=300)
    src = SafetensorsCheckpoint(tmp_path / "src")
    specs = [src.spec(n) for n in src.names]
    (tmp_path / "whole").mkdir()
    (tmp_path / "pieces").mkdir()
    whole = ShardedWriter(tmp_path / "whole", specs, 300)
    piecewise = ShardedWriter(tmp_path / "pieces", specs, 300)
    buffer = bytearray(7)  # odd size: pieces straddle element boundaries
    for spec in specs:
        whole.write(spec.name, src.read_bytes(spec.name))
        pieces = src.iter_bytes(spec.name, buffer)
        first = [bytes(p) for p in [next(pieces, None)] if p is not None]
        src.read_bytes(specs[0].name)  # another read on this thread between two pieces
        piecewise.write_stream(spec.name, first + [bytes(p) for p in pieces])
    assert whole.close() == piecewise.close()
    for f in (tmp_path / "whole").iterdir():
        assert f.read_bytes() == (tmp_path / "pieces" / f.name).read_bytes()


def test_write_stream_refuses_a_wrong_total(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "BF16", (2, 2)), TensorSpec("b", "F32", (3,))]
    (tmp_path / "short").mkdir()
    (tmp_path / "long").mkdir()
    w = ShardedWriter(tmp_path / "short", specs, 1 << 20)
    with pytest.raises(ValueError, match="got 7 bytes, planned 8"):
        w.write_stream("a", [b"\x00" * 4, b"\x00" * 3])
    w.abort()
    w = ShardedWriter(tmp_path / "long", specs, 1 << 20)
    with pytest.raises(ValueError, match="more than 9 bytes, planned 8"):
        w.write_stream("a", [b"\x00" * 4, b"\x00" * 5])
    w.abort()


class _FullFile:
    """A file object whose writes fail like a full disk."""

    def __init__(self, real) -> None:
        self.real = real

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.real.close()


def test_disk_full_is_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_mod, "open", lambda *a, **k: _FullFile(open(*a, **k)), raising=False)
    w = ShardedWriter(tmp_path, [TensorSpec("a", "F32", (4,))], 1 << 20)
    with pytest.raises(OutputError, match=r"disk full while writing .*model-00001-of-00001\.safetensors"):
        w.write("a", torch.zeros(4))
    w.abort()
    (tmp_path / "src.txt").write_text("tokenizer")
    with pytest.raises(OutputError, match=r"disk full while writing .*dst\.txt"):
        copy_file_hashed(tmp_path / "src.txt", tmp_path / "dst.txt")


def test_copy_file_hashed(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 2 MiB: several chunks
    (tmp_path / "src").write_bytes(data)
    digest = copy_file_hashed(tmp_path / "src", tmp_path / "dst")
    assert digest == hashlib.sha256(data).hexdigest() == sha256_file(tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data


def test_ensure_free_space(tmp_path: Path) -> None:
    ensure_free_space(tmp_path / "not" / "yet", 1)
    with pytest.raises(OutputError, match=r"not enough disk space in .*: need [\d.]+ GB, have [\d.]+ GB"):
        ensure_free_space(tmp_path / "not" / "yet", 1 << 62)


# -- StagedOutput ---------------------------------------------------------------------


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.transgqla-partial"


def test_staged_commit_fresh(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with StagedOutput(out, force=False, protect=[tmp_path / "src"]) as st:
        assert st.path == _staging(out) and (st.path / "INCOMPLETE").is_file()
        assert not out.exists()
        (st.path / "f.txt").write_text("new")
        st.commit()
    assert sorted(p.name for p in out.iterdir()) == ["f.txt"]
    assert not _staging(out).exists()


def test_staged_exception_leaves_marked_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with StagedOutput(out, force=False) as st:
            (st.path / "half.safetensors").write_bytes(b"xx")
            raise RuntimeError("boom")
    assert not out.exists()
    assert (_staging(out) / "INCOMPLETE").is_file() and (_staging(out) / "half.safetensors").is_file()
    # a new run clears the stale staging folder, unless resuming
    StagedOutput(out, force=False, resume=True)
    assert (_staging(out) / "half.safetensors").is_file()
    StagedOutput(out, force=False)
    assert sorted(p.name for p in _staging(out).iterdir()) == ["INCOMPLETE"]


def test_non_empty_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match=r"output folder .*out is not empty; pass --force to replace it"):
        StagedOutput(out, force=False)
    assert not _staging(out).exists()  # refused before anything was written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        StagedOutput(tmp_path / "afile", force=True)


def test_force_commit_replaces_old_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    st = StagedOutput(out, force=True)
    (st.path / "new.txt").write_text("new")
    assert (out / "old.txt").is_file()  # untouched until commit
    st.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_existing_out_is_fine(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    st = StagedOutput(tmp_path / "out", force=False)
    (st.path / "x").write_text("x")
    st.commit()
    assert (tmp_path / "out" / "x").is_file()


@pytest.mark.parametrize("rel", ["src", "src/sub/out", "."])
def test_out_overlapping_source_refused(tmp_path: Path, rel: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    out = tmp_path / rel
    with pytest.raises(OutputError, match="overlaps the source"):
        StagedOutput(out, force=True, protect=[src])
    assert not _staging(out).exists()
