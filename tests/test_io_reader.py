"""SafetensorsCheckpoint (io/reader.py) and resolve_source (io/hub.py), checked against the real `safetensors`
package."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from transgqla.errors import InputError, UnsupportedError  # noqa: E402
from transgqla.io.hub import resolve_source  # noqa: E402
from transgqla.io.reader import SafetensorsCheckpoint  # noqa: E402
from transgqla.io.safetensors_format import TensorSpec  # noqa: E402


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g, dtype=torch.float64),
        "model.position_ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "model.scalar": torch.tensor(3.5, dtype=torch.float16),
        "model.empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "model.mask": torch.tensor([True, False, True]),
    }


SHARDS = {
    "model-00001-of-00002.safetensors": [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.empty",
        "model.mask",
    ],
    "model-00002-of-00002.safetensors": [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.position_ids",
        "model.scalar",
    ],
}


def make_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """A two-shard checkpoint written by the reference `safetensors` library."""
    folder.mkdir(parents=True, exist_ok=True)
    ts = _tensors()
    weight_map = {}
    for file, names in SHARDS.items():
        safetensors_torch.save_file({n: ts[n] for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return ts


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as uint8 (bit-exact comparison, NaN-safe)."""
    return t.reshape(-1).view(torch.uint8)


def _raw_bytes_by_reference(path: Path, name: str) -> bytes:
    """Independent header parse to fetch what safetensors wrote for `name`."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    begin, end = json.loads(blob[8 : 8 + n])[name]["data_offsets"]
    return blob[8 + n + begin : 8 + n + end]


def test_sharded_read_bit_exact(tmp_path: Path) -> None:
    ts = make_sharded(tmp_path / "ckpt")
    with SafetensorsCheckpoint(tmp_path / "ckpt") as ck:
        assert ck.names == sorted(ts)
        assert len(ck) == len(ts)
        assert ck.total_bytes == sum(t.numel() * t.element_size() for t in ts.values())
        for name, ref in ts.items():
            got = ck.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous()
            assert torch.equal(_bits(got), _bits(ref))
            shard = ck.shard_of(name)
            assert shard.name in SHARDS and name in SHARDS[shard.name]
            assert ck.read_bytes(name) == _raw_bytes_by_reference(shard, name)
            assert name in ck
        spec = ck.spec("model.embed_tokens.weight")
        assert spec == TensorSpec("model.embed_tokens.weight", "BF16", (16, 8))
        assert spec.nbytes == 16 * 8 * 2
        assert "nope" not in ck


def test_concurrent_reads_from_several_threads_are_exact(tmp_path: Path) -> None:
    """The converter reads attention tensors on a worker thread while the main thread copies other
    tensors; with one shared file position the threads would interleave seeks and reads."""
    import threading

    folder = tmp_path / "ckpt"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in range(2):
        file = f"model-0000{shard + 1}-of-00002.safetensors"
        part = {f"t{shard}.{i}": torch.randn(256, 1024, generator=g) for i in range(4)}  # 1 MiB each
        safetensors_torch.save_file(part, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    want = {n: _raw_bytes_by_reference(folder / f, n) for n, f in weight_map.items()}
    names = sorted(want)
    errors: list[str] = []
    with SafetensorsCheckpoint(folder) as ck:
        def reader(offset: int) -> None:
            for i in range(120):
                name = names[(i * (offset + 1) + offset) % len(names)]
                try:
                    if i % 2:
                        got = ck.read_bytes(name)
                    else:
                        got = ck.read(name).reshape(-1).view(torch.uint8).numpy().tobytes()
                except Exception as exc:  # a handle closed or moved by another thread
                    errors.append(f"{name}: {exc!r}")
                    continue
                if got != want[name]:
                    errors.append(f"{name}: wrong bytes")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[:5]


def test_read_result_owns_memory(tmp_path: Path) -> None:
    make_sharded(tmp_path / "ckpt")
    ck = SafetensorsCheckpoint(tmp_path / "ckpt")
    a = ck.read("model.layers.0.self_attn.k_proj.weight")
    b = ck.read("model.layers.0.self_attn.k_proj.weight")
    a.add_(1.0)  # writable, and not shared with a second read
    assert not torch.equal(a, b)
    ck.close()


def test_single_file_and_any_single_safetensors(tmp_path: Path) -> None:
    ts = {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4)}
    (tmp_path / "a").mkdir()
    safetensors_torch.save_file(ts, tmp_path / "a" / "model.safetensors")
    (tmp_path / "b").mkdir()
    safetensors_torch.save_file(ts, tmp_path / "b" / "weights.safetensors")
    for sub in ("a", "b"):
        ck = SafetensorsCheckpoint(tmp_path / sub)
        assert ck.names == ["b", "w"]
        assert all(torch.equal(ck.read(n), ts[n]) for n in ts)


def test_fingerprint_is_header_identity(tmp_path: Path) -> None:
    make_sharded(tmp_path / "x")
    make_sharded(tmp_path / "y")
    fx = SafetensorsCheckpoint(tmp_path / "x").fingerprint()
    assert fx == SafetensorsCheckpoint(tmp_path / "y").fingerprint()
    safetensors_torch.save_file({"z": torch.zeros(2)}, tmp_path / "y" / "model-00001-of-00002.safetensors")
    index = json.loads((tmp_path / "y" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {"z": "model-00001-of-00002.safetensors"}
    (tmp_path / "y" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert SafetensorsCheckpoint(tmp_path / "y").fingerprint() != fx


# -- validation failures: every one is an InputError naming the culprit -------------


def test_truncated_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    shard = tmp_path / "c" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(InputError, match=r"model-00002-of-00002\.safetensors is truncated"):
        SafetensorsCheckpoint(tmp_path / "c")


@pytest.mark.parametrize(
    "blob",
    [
        struct.pack("<Q", 12) + b"{not json!!}",
        struct.pack("<Q", 1 << 60) + b"{}      ",
        struct.pack("<Q", 400) + b"{}      ",
        b"\x01\x02",
        struct.pack("<Q", 8) + b"[1,2,3] ",
        struct.pack("<Q", 16) + b'{"a":{"dtype":1',
    ],
    ids=["garbage-json", "absurd-length", "length-past-eof", "too-short", "not-object", "cut-in-header"],
)
def test_corrupt_header(tmp_path: Path, blob: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(InputError, match=r"model\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def _write_header(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_unknown_dtype_is_unsupported(tmp_path: Path) -> None:
    _write_header(tmp_path / "model.safetensors", {"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"x")
    with pytest.raises(UnsupportedError, match=r"model\.safetensors: tensor 't' has dtype 'F4'"):
        SafetensorsCheckpoint(tmp_path)


def test_header_semantic_checks(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    cases = {
        "needs": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
        "overlap": {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        "bad shape": {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    }
    for pattern, header in cases.items():
        _write_header(path, header, bytes(16))
        with pytest.raises(InputError, match=pattern):
            SafetensorsCheckpoint(tmp_path)
    body = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(8))
    with pytest.raises(InputError, match="duplicate"):
        SafetensorsCheckpoint(tmp_path)


def _edit_index(folder: Path, fn) -> None:
    p = folder / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index["weight_map"])
    p.write_text(json.dumps(index))


def test_index_names_missing_file(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    _edit_index(tmp_path / "c", lambda wm: wm.update({"extra": "model-00003-of-00003.safetensors"}))
    with pytest.raises(InputError, match=r"model-00003-of-00003\.safetensors.*does not exist"):
        SafetensorsCheckpoint(tmp_path / "c")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_escape(tmp_path: Path, bad: str) -> None:
    make_sharded(tmp_path / "c")
    _edit_index(tmp_path / "c", lambda wm: wm.update({"extra": bad}))
    with pytest.raises(InputError, match="escapes the checkpoint folder"):
        SafetensorsCheckpoint(tmp_path / "c")


def test_symlink_outside_rejected(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    outside = tmp_path / "elsewhere.safetensors"
    shard = tmp_path / "c" / "model-00001-of-00002.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(InputError, match="symlink pointing outside"):
        SafetensorsCheckpoint(tmp_path / "c")


def test_index_tensor_missing_from_shard(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    _edit_index(tmp_path / "c", lambda wm: wm.update({"ghost": "model-00001-of-00002.safetensors"}))
    with pytest.raises(InputError, match="'ghost'.*missing from shard"):
        SafetensorsCheckpoint(tmp_path / "c")


def test_index_not_json(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(InputError, match=r"index .*index\.json is not valid JSON"):
        SafetensorsCheckpoint(tmp_path / "c")


def test_pickle_only_folder(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"only pickle \(\.bin\) weights"):
        SafetensorsCheckpoint(tmp_path)


def test_no_weights_and_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no safetensors"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        SafetensorsCheckpoint(tmp_path / "nope")


def test_unknown_tensor(tmp_path: Path) -> None:
    make_sharded(tmp_path / "c")
    ck = SafetensorsCheckpoint(tmp_path / "c")
    for fn in (ck.read, ck.read_bytes, ck.spec, ck.shard_of):
        with pytest.raises(InputError, match="'lm_head.weight' is not in checkpoint"):
            fn("lm_head.weight")


# -- resolve_source (never touches the network) --------------------------------------


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def _fake_cache(cache: Path, repo: str, commit: str = "0123abcd" * 5) -> Path:
    """The huggingface_hub cache layout: refs/main -> commit, snapshot files symlink to blobs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "refs").mkdir(parents=True)
    (root / "blobs").mkdir()
    snap.mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    stage = root / "stage"
    make_sharded(stage)
    for f in sorted(stage.iterdir()):
        blob = root / "blobs" / f"blob-{f.name}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    stage.rmdir()
    return snap


def test_resolve_local_folder(tmp_path: Path, offline_hf: Path) -> None:
    make_sharded(tmp_path / "ckpt")
    rs = resolve_source(str(tmp_path / "ckpt"))
    assert rs.path == (tmp_path / "ckpt").resolve() and rs.identity["local"] is True


def test_resolve_errors_offline(tmp_path: Path, offline_hf: Path) -> None:
    with pytest.raises(InputError, match=r"cannot resolve model 'acme/nothing' offline: not in the Hugging Face cache"):
        resolve_source("acme/nothing")
    with pytest.raises(InputError, match="does not exist"):
        resolve_source(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_source(str(tmp_path / "f.txt"))


def test_resolve_from_offline_cache(offline_hf: Path) -> None:
    snap = _fake_cache(offline_hf, "acme/tiny")
    rs = resolve_source("acme/tiny")
    assert rs.path == snap.resolve()
    assert rs.identity["local"] is False and rs.identity["commit"] == snap.name
    ck = SafetensorsCheckpoint(rs.path)  # symlinks into the repo's blobs/ are allowed
    assert torch.equal(ck.read("model.position_ids"), _tensors()["model.position_ids"])


def test_resolve_network_failure_falls_back_to_cache(offline_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snap = _fake_cache(offline_hf, "acme/tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    calls: list[bool] = []

    def fake(repo_id: str, **kw):
        calls.append(kw.get("local_files_only", False))
        if not kw.get("local_files_only"):
            raise OSError("network is unreachable")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_source("acme/tiny").path == snap.resolve()
    assert calls == [False, True]
    with pytest.raises(InputError, match=r"cannot download model 'acme/other' \(network is unreachable\)"):
        resolve_source("acme/other")


def test_read_rows_are_slices_of_the_stored_tensor(tmp_path: Path) -> None:
    ts = make_sharded(tmp_path / "ckpt")
    with SafetensorsCheckpoint(tmp_path / "ckpt") as ck:
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.position_ids"):
            ref = ts[name]
            for start, stop in ((0, 1), (2, 3), (1, ref.shape[0]), (0, ref.shape[0]), (2, 2)):
                got = ck.read_rows(name, start, stop)
                assert got.dtype == ref.dtype and got.shape == ref[start:stop].shape
                assert torch.equal(_bits(got), _bits(ref[start:stop].contiguous()))
        for bad in ((-1, 2), (3, 2), (0, 17)):
            with pytest.raises(ValueError):
                ck.read_rows("model.embed_tokens.weight", *bad)
        with pytest.raises(ValueError):
            ck.read_rows("model.scalar", 0, 1)
