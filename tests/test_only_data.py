"""Only the input's own files, only data: what convert and every export carry besides the weights.

* a tokenizer or generation file that is a symlink out of the source is refused (not followed into OUT), a FIFO
  is refused without hanging, while a Hugging Face cache snapshot (links into its blobs) converts as usual;
* code never travels: a source's ``tokenizer_evil.py`` stays behind and ``tokenizer_config.json`` loses its
  ``auto_map``, so loading OUT's tokenizer with ``trust_remote_code=True`` runs nothing from the source (the
  same load of the source does run it: the payload is real);
* every export carries the same: no foreign code, no ``auto_map``, no symlinked file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.format import MANIFEST
from transgqla.io import sha256_file

from conftest import make_source
from test_calibration import make_tokenizer

runner = CliRunner()
SMALL = ["--kv-lora-rank", "24", "--qk-rope-dim", "8", "--calib", "none"]
EVIL = """
from pathlib import Path
Path({marker!r}).write_text("the source's code ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("only-data") / "src"
    make_source(folder, "llama", layers=2)
    make_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    return folder


@pytest.fixture
def src(base, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(base, folder)
    return folder


def plant_code(folder: Path, marker: Path) -> None:
    """A remote-code tokenizer: the module writes ``marker`` when imported; tokenizer_config points at it."""
    (folder / "tokenizer_evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenizer_evil.EvilTokenizer", "tokenizer_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def load_tokenizer_trusting(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                                  "tokenizer.json"])
def test_a_file_linked_out_of_the_source_is_refused_not_copied(src, tmp_path, name):
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(secret)
    out = tmp_path / "out"
    r = invoke("convert", src, out, *SMALL)
    assert r.exit_code == 2, r.output
    assert f"{name} is a symlink to {secret}, outside the checkpoint folder" in one_error_line(r)
    assert not out.exists() and not (tmp_path / ".out.transgqla-partial").exists()


def test_a_fifo_is_refused_without_hanging(src, tmp_path):
    (src / "generation_config.json").unlink()
    os.mkfifo(src / "generation_config.json")
    r = invoke("convert", src, tmp_path / "out", *SMALL)
    assert r.exit_code == 2 and "generation_config.json is not a regular file" in one_error_line(r), r.output


def test_a_link_inside_the_source_or_into_a_hub_cache_blob_is_copied_as_a_file(base, tmp_path):
    snap = tmp_path / "hub" / "models--o--m" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "models--o--m" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in base.iterdir():  # the cache's layout: every snapshot file a link to its content-named blob
        blob = blobs / sha256_file(f)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    out = tmp_path / "out"
    r = invoke("convert", snap, out, *SMALL)
    assert r.exit_code == 0, r.output
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (base / name).read_bytes()


def test_the_sources_code_is_not_shipped_and_does_not_run_from_out(src, tmp_path):
    marker = tmp_path / "ran.txt"
    plant_code(src, marker)
    load_tokenizer_trusting(src)  # the payload is real: loading the source trusting it runs it
    assert marker.is_file()
    marker.unlink()
    out = tmp_path / "out"
    r = invoke("convert", src, out, *SMALL, "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.glob("*.py")) == ["configuration_gqla.py", "modeling_gqla.py"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    notes = json.loads(r.stdout)["notes"]
    assert any("dropped auto_map from tokenizer_config.json" in n for n in notes), notes
    assert any("tokenizer_evil.py" in n and "not copied" in n for n in notes), notes
    tok = load_tokenizer_trusting(out)
    assert type(tok).__name__ != "EvilTokenizer" and not marker.exists()
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert manifest["tokenizer_config.json"] == sha256_file(out / "tokenizer_config.json")


EXPORTS = {"gqla": ["--path", "gqa"], "folded": ["--path", "gqa", "--fold-kv"],
           "deepseek": ["--path", "absorb", "--format", "deepseek"], "mimo": ["--path", "gqa", "--format", "mimo"]}


@pytest.fixture(scope="module")
def out_with_code(base, tmp_path_factory) -> tuple[Path, Path]:
    """A conversion whose OUT was then given foreign code and an auto_map, its manifest re-hashed (what an older
    transgqla wrote, or a hand edit)."""
    root = tmp_path_factory.mktemp("only-data-out")
    out = root / "out"
    r = invoke("convert", base, out, *SMALL)
    assert r.exit_code == 0, r.output
    marker = root / "ran.txt"
    plant_code(out, marker)
    doc = json.loads((out / MANIFEST).read_text())
    for name in ("tokenizer_evil.py", "tokenizer_config.json"):
        doc["files"][name] = sha256_file(out / name)
        doc.get("sizes", {})[name] = (out / name).stat().st_size
    (out / MANIFEST).write_text(json.dumps(doc))
    return out, marker


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_every_export_carries_only_data(out_with_code, tmp_path, kind):
    out, marker = out_with_code
    dst = tmp_path / "dst"
    r = invoke("export", out, dst, *EXPORTS[kind], "--json")
    assert r.exit_code == 0, r.output
    assert not (dst / "tokenizer_evil.py").exists()
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())
    assert any("dropped auto_map" in w for w in json.loads(r.stdout)["warnings"])
    if kind == "deepseek":  # sold as needing no remote code: it loads, and nothing of OUT's ran
        load_tokenizer_trusting(dst)
        assert not marker.exists()


def test_an_export_refuses_a_file_linked_out_of_out(out_with_code, tmp_path):  # OUT's manifest check: no links
    out = tmp_path / "out"
    shutil.copytree(out_with_code[0], out)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "generation_config.json").symlink_to(secret)
    r = invoke("export", out, tmp_path / "dst", "--path", "gqa")
    assert r.exit_code == 2 and "symlinks (refused): generation_config.json" in one_error_line(r), r.output
    assert not (tmp_path / "dst").exists()
