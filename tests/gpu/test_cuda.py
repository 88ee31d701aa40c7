"""The commands on a real CUDA device, end to end on tiny models; skipped without CUDA.

CPU-only CI proves the same paths device-clean with tests/test_device.py's fake device; these run
them where they matter (``python -m pytest -q tests/gpu`` on a GPU machine; benchmarks/gpu_check.py
is the larger, timed check). Each result is compared with the same command on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from transgqla.cli.app import app

from conftest import make_source
from test_calibration import make_tokenizer, tiny_text

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
runner = CliRunner()
SMALL = ["--kv-lora-rank", "20", "--qk-rope-dim", "8"]


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu") / "src"
    make_source(folder, "qwen2", layers=2)
    make_tokenizer(folder)
    (folder.parent / "calib.txt").write_text(tiny_text(3000))
    return folder


@pytest.fixture(scope="module")
def outs(src):
    calib = ["--calib", src.parent / "calib.txt", "--calib-tokens", 512, "--calib-seqlen", 32, "--sequential"]
    docs = {}
    for device in ("cuda", "cpu"):
        docs[device] = invoke("convert", src, src.parent / f"out-{device}", *SMALL, *calib, "--device", device, "--json")
    return {d: src.parent / f"out-{d}" for d in docs}, docs


def test_calibrated_convert_on_cuda_matches_the_cpu(outs):
    folders, docs = outs
    cuda, cpu = docs["cuda"]["worst_layer_errors"], docs["cpu"]["worst_layer_errors"]
    for key in cpu:
        assert cuda[key] == pytest.approx(cpu[key], rel=1e-2, abs=1e-6), key


def test_verify_on_cuda(src, outs):
    doc = invoke("verify", outs[0]["cuda"], "--source", src, "--device", "cuda", "--json")
    assert doc["ok"] and str(doc.get("device") or doc.get("info")).startswith("cuda")


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_eval_ppl_on_cuda_matches_the_cpu(src, outs, path):
    args = ["eval-ppl", outs[0]["cpu"], "--text", src.parent / "calib.txt", "--seqlen", 32, "--path", path, "--json"]
    cuda, cpu = invoke(*args, "--device", "cuda"), invoke(*args, "--device", "cpu")
    assert cuda["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4)


@pytest.mark.parametrize("flags", [["--format", "gqla", "--path", "gqa"], ["--format", "deepseek", "--path", "absorb", "--q-lora-bias"]])
def test_export_check_on_cuda(outs, tmp_path, flags):
    doc = invoke("export", outs[0]["cuda"], tmp_path / "dst", *flags, "--device", "cuda", "--json")
    assert doc["ok"]
