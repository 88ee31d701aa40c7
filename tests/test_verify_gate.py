"""verify as a gate that cannot be switched off or talked into passing, and exports that refuse a damaged OUT.

Each hostile edit below re-hashes the manifest afterwards (what someone who knows the format would do), so the
manifest alone cannot be what catches it:

* ``model_type`` edited to ``deepseek_v3`` with NaN weights: the integrity checks still run (finiteness fails);
* a DeepSeek export with NaN weights, its OUT gone: its own manifest and the finiteness scan fail it;
* a modified ``modeling_gqla.py``: compared with the copy the installed package ships, naming the writer's version;
* a retargeted ``auto_map``: it must equal the format's;
* a symlinked ``modeling_gqla.py`` (same bytes): symlinks under OUT are refused;
* one flipped byte in a shard: every export refuses OUT before writing anything.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from transgqla import __version__
from transgqla.cli.app import app
from transgqla.format import MANIFEST
from transgqla.io import sha256_file

from conftest import make_source

runner = CliRunner()
SMALL = ["--kv-lora-rank", "24", "--qk-rope-dim", "8", "--calib", "none"]
FAST = ["--tokens", "2", "--device", "cpu", "--json"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rehash(folder: Path) -> None:
    """Rewrite the manifest so that it lists every regular file as it now is (a forger's last step)."""
    doc = json.loads((folder / MANIFEST).read_text())
    files = [p for p in folder.iterdir() if p.name != MANIFEST and not p.is_symlink() and p.is_file()]
    doc["files"] = {p.name: sha256_file(p) for p in files}
    doc["sizes"] = {p.name: p.stat().st_size for p in files}
    (folder / MANIFEST).write_text(json.dumps(doc))


def poison(folder: Path, name: str) -> None:
    """Overwrite the first value of tensor ``name`` (float32) with NaN, in place in its shard."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    entry = json.loads(raw[8:8 + n])[name]
    assert entry["dtype"] == "F32"
    start = 8 + n + entry["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(bytes(raw))


def verify(folder: Path, *extra) -> tuple[int, dict]:
    r = invoke("verify", folder, *FAST, *extra)
    return r.exit_code, json.loads(r.stdout)


def failed(doc: dict) -> dict[str, str]:
    return {c["name"]: c["message"] for c in doc["checks"] if c["ok"] is False}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    make_source(root / "src", "llama", layers=2)
    r = invoke("convert", root / "src", root / "out", *SMALL)
    assert r.exit_code == 0, r.output
    return root / "out"


@pytest.fixture
def out(converted, tmp_path) -> Path:
    folder = tmp_path / "out"
    shutil.copytree(converted, folder, symlinks=True)
    return folder


def test_a_clean_conversion_passes_the_gate(out):
    code, doc = verify(out, "--checks", "structure")
    assert code == 0, failed(doc)
    names = {c["name"] for c in doc["checks"]}
    assert {"structure.files", "structure.finite", "structure.manifest", "structure.remote_code"} <= names


def test_an_edited_model_type_does_not_skip_the_integrity_checks(out):
    poison(out, "model.layers.1.mlp.down_proj.weight")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (out / "config.json").write_text(json.dumps(cfg))
    rehash(out)
    code, doc = verify(out)
    assert code == 5
    assert "model.layers.1.mlp.down_proj.weight: 1 NaN" in failed(doc)["structure.finite"]


def test_nan_weights_fail_whatever_checks_are_asked_for(out):
    poison(out, "model.norm.weight")
    rehash(out)
    code, doc = verify(out, "--checks", "paths")
    assert code == 5 and "structure.finite" in failed(doc), doc["checks"]


def test_a_deepseek_export_with_nan_weights_fails_without_its_out(converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    dst = tmp_path / "dst"
    r = invoke("export", out, dst, "--path", "absorb", "--format", "deepseek")
    assert r.exit_code == 0, r.output
    shutil.rmtree(out)
    code, doc = verify(dst)
    assert code == 0, failed(doc)  # what it needs travels with it: integrity holds, the recheck is skipped
    assert next(c for c in doc["checks"] if c["name"] == "export.reference")["ok"] is None
    poison(dst, "model.layers.0.mlp.up_proj.weight")
    code, doc = verify(dst)
    assert code == 5 and "sha256 or size differs" in failed(doc)["structure.manifest"]
    rehash(dst)
    code, doc = verify(dst)
    assert code == 5 and "model.layers.0.mlp.up_proj.weight: 1 NaN" in failed(doc)["structure.finite"]


def test_modified_remote_code_fails_and_names_the_writer(out):
    with open(out / "modeling_gqla.py", "a") as fh:
        fh.write("\nimport os  # a payload would go here\n")
    rehash(out)
    code, doc = verify(out, "--checks", "structure")
    msg = failed(doc)["structure.remote_code"]
    assert code == 5 and f"modeling_gqla.py differs from the copy transgqla {__version__} ships" in msg
    assert f"written by transgqla {__version__}" in msg


def test_a_retargeted_auto_map_fails(out):
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "payload.Model"
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "payload.py").write_text("raise SystemExit('ran')\n")
    rehash(out)
    code, doc = verify(out, "--checks", "structure")
    assert code == 5 and "auto_map must name" in failed(doc)["structure.config"]


def test_a_symlink_under_out_is_refused(out, tmp_path):
    shutil.move(out / "modeling_gqla.py", tmp_path / "modeling_gqla.py")
    (out / "modeling_gqla.py").symlink_to(tmp_path / "modeling_gqla.py")  # the same bytes, elsewhere
    rehash(out)
    code, doc = verify(out, "--checks", "structure")
    assert code == 5 and "symlinks (refused): modeling_gqla.py" in failed(doc)["structure.files"]


EXPORTS = {"gqla": ["--path", "gqa"], "folded": ["--path", "gqa", "--fold-kv"],
           "deepseek": ["--path", "absorb", "--format", "deepseek"], "mimo": ["--path", "gqa", "--format", "mimo"],
           "gguf": ["--path", "absorb", "--format", "gguf"]}


@pytest.fixture
def flipped(converted, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # one bit of the last tensor's data: the headers still agree
    shard.write_bytes(bytes(raw))
    return out


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_every_export_refuses_an_out_with_a_flipped_byte(flipped, tmp_path, kind):
    dst = tmp_path / ("dst.gguf" if kind == "gguf" else "dst")
    r = invoke("export", flipped, dst, *EXPORTS[kind])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"does not match its {MANIFEST} (sha256 or size differs: model-" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
