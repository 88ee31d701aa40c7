"""Bounded input: ``--calib`` and ``verify --text`` take regular text files only, judged on their first bytes
before any work, and read them in chunks up to the token budget; a config's layer count is checked against the
tensor names before anything is built per layer. Memory claims run in a child process under an ``RLIMIT_DATA``
cap (heap and anonymous maps), so a regression fails the test instead of the machine; nothing is timed.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.format import MANIFEST
from transgqla.io import sha256_file

from conftest import make_source
from test_calibration import WORDS, make_tokenizer

runner = CliRunner()
SMALL = ["--kv-lora-rank", "24", "--qk-rope-dim", "8"]
CALIB = ["--calib-tokens", "2048", "--calib-seqlen", "64", "--refine", "0"]
CAP_BYTES = 3 << 29  # 1.5 GiB: a tiny conversion needs ~0.45 GB; reading 64 MB of text whole needs several GB
BIG_TEXT_BYTES = 64 << 20


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def capped(*args) -> subprocess.CompletedProcess:
    """The CLI in a child whose heap is capped at :data:`CAP_BYTES`."""
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (CAP_BYTES, CAP_BYTES))

    cmd = [sys.executable, "-m", "transgqla.cli.app", *map(str, args)]
    return subprocess.run(cmd, preexec_fn=cap, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bounded") / "src"
    make_source(folder, "llama", layers=2)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bounded-text") / "big.txt"
    line = " ".join(WORDS[:100]) + "\n"
    with open(path, "w") as fh:
        fh.write(line * (BIG_TEXT_BYTES // len(line)))
    return path


@pytest.fixture(scope="module")
def out(src, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bounded-out") / "out"
    r = invoke("convert", src, folder, *SMALL, "--calib", "none")
    assert r.exit_code == 0, r.output
    return folder


def not_text_inputs(src: Path, tmp: Path) -> dict[str, Path]:
    noise = tmp / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(100_000))  # a .txt of random bytes
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 100)
    return {"program": Path(sys.executable).resolve(), "safetensors": sorted(src.glob("*.safetensors"))[0],
            "noise": noise, "latin1": latin1}


@pytest.mark.parametrize("kind", ["program", "safetensors", "noise", "latin1"])
def test_calib_refuses_what_is_not_text_before_any_work(src, tmp_path, kind):
    path = not_text_inputs(src, tmp_path)[kind]
    out = tmp_path / "out"
    r = invoke("convert", src, out, *SMALL, "--calib", "builtin:calib", "--calib", path, *CALIB)
    assert r.exit_code == 2, r.output
    line = one_error_line(r.stderr)
    assert line.startswith(f"error: --calib {path} is not text: ") and "UTF-8 text file" in line, line
    assert not out.exists() and not (tmp_path / ".out.transgqla-partial").exists()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_calib_and_text_refuse_special_files_without_reading_them(src, out, tmp_path, special):
    path = Path(special)
    if special == "fifo":
        path = tmp_path / "fifo.txt"
        os.mkfifo(path)
    elif special == "folder":
        path = tmp_path
    r = invoke("convert", src, tmp_path / "o", *SMALL, "--calib", path, *CALIB)
    assert r.exit_code == 2 and f"--calib {path} is" in one_error_line(r.stderr), r.output
    r = invoke("verify", out, "--text", path, "--device", "cpu")
    assert r.exit_code == 2 and f"--text {path} is" in one_error_line(r.stderr), r.output


def test_verify_text_refuses_binary(src, out, tmp_path):
    for path in not_text_inputs(src, tmp_path).values():
        r = invoke("verify", out, "--text", path, "--device", "cpu")
        assert r.exit_code == 2 and "is not text" in one_error_line(r.stderr), r.output


def test_a_large_calibration_file_is_read_only_up_to_the_budget(src, big_text, tmp_path):
    out = tmp_path / "out"
    p = capped("convert", src, out, *SMALL, "--calib", big_text, *CALIB, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    calib = json.loads((out / "config.json").read_text())["gqla"]["conversion"]["calibration"]
    assert calib["tokens"] == 2048 and calib["text_sources"] == [str(big_text)]


def test_verify_text_on_a_large_file_is_bounded(src, out, big_text):
    p = capped("verify", out, "--text", big_text, "--checks", "fidelity", "--seqlen", "64", "--max-tokens", "256",
               "--source", src, "--device", "cpu", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert doc["text"] == str(big_text)
    assert "4 window(s)" in next(c for c in doc["checks"] if c["name"] == "fidelity.attention")["message"]


def test_a_tokenized_text_shorter_than_a_chunk_equals_the_whole_texts_tokens(src, tmp_path):
    from transgqla.text.pipeline import encode, load_tokenizer, source_windows
    from transgqla.text.reading import chunks

    tok = load_tokenizer(src)
    text = "\n".join(" ".join(WORDS[i % 50: i % 50 + 7]) for i in range(3000))
    (tmp_path / "t.txt").write_text(text)
    whole = encode(tok, text)
    wins = source_windows([str(tmp_path / "t.txt")], tok, 16)
    assert wins.flatten().tolist() == whole[: wins.numel()]
    pieces = list(chunks([text[:500], text[500:]], size=1000))  # cut after a newline, never inside a word
    assert "".join(pieces) == text and all(p.endswith("\n") for p in pieces[:-1])
    assert sum(len(encode(tok, p)) for p in pieces) == len(whole)


def test_a_config_claiming_a_billion_layers_is_refused_before_per_layer_work(src, out, tmp_path):
    huge = tmp_path / "huge"
    shutil.copytree(src, huge)
    cfg = json.loads((huge / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (huge / "config.json").write_text(json.dumps(cfg))
    p = capped("convert", huge, tmp_path / "o", *SMALL, "--calib", "none")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "num_hidden_layers = 1000000000, but the tensors hold 2 layers" in one_error_line(p.stderr)

    edited = tmp_path / "edited"  # the same claim in a GQLA checkpoint, its manifest re-hashed
    shutil.copytree(out, edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (edited / "config.json").write_text(json.dumps(cfg))
    doc = json.loads((edited / MANIFEST).read_text())
    doc["files"]["config.json"] = sha256_file(edited / "config.json")
    doc["sizes"]["config.json"] = (edited / "config.json").stat().st_size
    (edited / MANIFEST).write_text(json.dumps(doc))
    p = capped("verify", edited, "--device", "cpu", "--json")
    assert p.returncode == 5, p.stderr[-2000:]
    failed = {c["name"]: c["message"] for c in json.loads(p.stdout)["checks"] if c["ok"] is False}
    assert "but the tensors hold 2 layers" in failed["structure.tensors"], failed
    for export in (["--path", "gqa"], ["--path", "absorb", "--format", "deepseek"]):  # refused before its loop
        r = invoke("export", edited, tmp_path / "dst", *export)
        assert r.exit_code == 2 and "the tensors hold 2 layers" in one_error_line(r.stderr), r.output
