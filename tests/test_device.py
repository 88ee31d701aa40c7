"""One device, end to end, proven without a GPU: every command's computation runs on a fake second
device (tests/device_harness.py) that raises wherever a tensor made on the CPU meets device data, as
CUDA would, and gives the same numbers as the CPU run. Plus the one ``--device`` parser."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.convert import LAYER_WORKERS_ENV, ConvertRequest, convert
from transgqla.devices import resolve_device
from transgqla.errors import InputError
from transgqla.evaluate import open_decoder, perplexity
from transgqla.io import SafetensorsCheckpoint
from transgqla.model.attention import PATHS

from conftest import make_source
from device_harness import DeviceMismatch, FakeDevice
from test_calibration import make_tokenizer, tiny_text

DEV = "meta"  # the harness's fake device


def accept_the_fake_device(monkeypatch):
    """The shared ``--device`` parser refuses ``meta`` (rightly): let it through for these tests."""
    import transgqla.devices as devices

    real = devices.resolve_device
    monkeypatch.setattr(devices, "resolve_device", lambda name: torch.device(DEV) if name == DEV else real(name))


def test_the_harness_raises_where_cuda_would_and_allows_what_cuda_allows():
    with FakeDevice():
        x = torch.randn(3, 4, device=DEV)
        assert x.device.type == DEV
        with pytest.raises(DeviceMismatch):
            x + torch.ones(4)
        with pytest.raises(DeviceMismatch):
            torch.cat((x, torch.zeros(1, 4)))
        y = x + torch.tensor(1.0)  # a CPU scalar mixes, as on CUDA
        h = torch.zeros(4, 4, device=DEV)
        h[1:] = x  # copy between devices
        assert torch.equal(h[torch.tensor([1, 2, 3])].cpu(), x.cpu())  # CPU indices
        assert torch.allclose((y - 1).cpu(), x.cpu())
        assert x.to("cpu").device.type == "cpu"


@pytest.fixture(scope="module")
def calib_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device") / "src"
    make_source(folder, "qwen2", layers=2, n_heads=4, n_kv=2, head_dim=16)  # biases too
    make_tokenizer(folder)
    text = folder.parent / "calib.txt"
    text.write_text(tiny_text(2000))
    return folder, text


def _convert(src, text, out, device):
    return convert(ConvertRequest(source=str(src), out=out, kv_lora_rank=20, qk_rope_dim=8, calib=[str(text)],
                                  calib_tokens=256, calib_seqlen=32, sequential=True, method="gqla", device=device))


@pytest.fixture(scope="module")
def converted(calib_source, tmp_path_factory):
    src, text = calib_source
    out = tmp_path_factory.mktemp("device-cpu") / "out"
    _convert(src, text, out, "cpu")
    return out


def _tensors(folder):
    ck = SafetensorsCheckpoint(folder)
    return {n: ck.read(n) for n in ck.names}


def test_calibrated_conversion_runs_on_the_device(calib_source, converted, tmp_path, monkeypatch):
    """Calibration statistics, the sequential layer-by-layer runner and the per-layer converter, with
    the calibration on the fake device: no CPU tensor meets its data, and the result is the CPU's."""
    src, text = calib_source
    monkeypatch.setenv(LAYER_WORKERS_ENV, "0")  # the harness is thread-local
    with FakeDevice():
        _convert(src, text, tmp_path / "out", DEV)
    got, want = _tensors(tmp_path / "out"), _tensors(converted)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-6), name


def test_data_free_conversion_runs_on_the_device(calib_source, tmp_path, monkeypatch):
    """The data-free per-layer math (RoRoPE/FreqFold PCA, the joint factorization) on the fake device."""
    src = calib_source[0]
    req = dict(source=str(src), kv_lora_rank=20, qk_rope_dim=8, calib=None)
    convert(ConvertRequest(out=tmp_path / "cpu", **req))
    monkeypatch.setenv(LAYER_WORKERS_ENV, "0")
    with FakeDevice():
        convert(ConvertRequest(out=tmp_path / "dev", device=DEV, **req))
    got, want = _tensors(tmp_path / "dev"), _tensors(tmp_path / "cpu")
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("which", ["source", "gqla"])
def test_reference_decoders_run_on_the_device(calib_source, converted, which):
    folder = calib_source[0] if which == "source" else converted
    config = json.loads((folder / "config.json").read_text())
    ids = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35]])
    paths = PATHS if which == "gqla" else (None,)
    ref = open_decoder(folder, config)
    with FakeDevice():
        dec = open_decoder(folder, config, device=DEV)
        for path in paths:
            logits = dec.forward(ids, dec.new_cache(path))
            assert logits.device.type == DEV
            cache = dec.new_cache(path)  # prefill, then cached decode one token at a time
            steps = [dec.forward(ids[:, :5], cache)] + [dec.forward(ids[:, t:t + 1], cache) for t in range(5, 8)]
            generated = dec.generate(ids, 3, path)
            assert torch.allclose(logits.cpu(), ref.forward(ids, ref.new_cache(path)), atol=1e-5)
            assert torch.allclose(torch.cat(steps, 1).cpu(), logits.cpu(), atol=1e-4)
            assert torch.equal(generated.cpu(), ref.generate(ids, 3, path))


@pytest.mark.parametrize("which", ["source", "gqla"])
def test_eval_ppl_runs_on_the_device(calib_source, converted, which):
    folder = calib_source[0] if which == "source" else converted
    if which == "gqla":
        (folder / "tokenizer.json").exists() or pytest.fail("the tokenizer is copied")
    text = calib_source[1]
    want = perplexity(str(folder), [str(text)], seqlen=32, max_tokens=256)
    with FakeDevice():
        got = perplexity(str(folder), [str(text)], seqlen=32, max_tokens=256, device=DEV)
    assert got.perplexity == pytest.approx(want.perplexity, rel=1e-5)


def test_one_device_parser(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for bad in ("cuda", "cuda:1", "tpu"):
        with pytest.raises(InputError):
            resolve_device(bad)


@pytest.mark.parametrize("command", [["convert", "SRC", "OUT"], ["eval-ppl", "SRC", "--text", "builtin:eval"]])
def test_cuda_without_cuda_is_one_line(command, calib_source, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [str(calib_source[0]) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = CliRunner().invoke(app, [*args, "--device", "cuda"])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "CUDA is not available" in lines[0], r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt,path", [("gqla", "gqa"), ("deepseek", "absorb")])
def test_export_reference_check_runs_on_the_device(converted, tmp_path, monkeypatch, fmt, path):
    """The export's reference decoder and its candidate (our decoder, or stock transformers'
    DeepSeek-V3 for the DeepSeek export) on the fake device, with the CPU's verdict and figures."""
    from transgqla.export import ExportRequest, run_export

    lora = fmt == "deepseek"  # the Qwen2 query bias goes through q_lora_rank
    target = "transformers" if lora else "engines"  # the engines have no query-bias slot
    want = run_export(ExportRequest(converted, tmp_path / "cpu", path=path, format=fmt, query_bias_lora=lora,
                                    target=target))
    accept_the_fake_device(monkeypatch)
    with FakeDevice():
        got = run_export(ExportRequest(converted, tmp_path / "dev", path=path, format=fmt, query_bias_lora=lora,
                                       target=target, device=DEV))
    assert got.ok and want.ok
    assert got.check.tokens_candidate == want.check.tokens_candidate
    assert got.check.rel_error == pytest.approx(want.check.rel_error, rel=1e-3, abs=1e-9)


def test_verify_runs_on_the_device(calib_source, converted, monkeypatch):
    """verify's structure, fidelity-to-the-source and decode sections on the fake device give the CPU's
    figures. (``paths`` is left out for time: its attention calls are the reference decoders' above;
    run once by hand under the harness, it gave the CPU's 2.14e-07 to the last digit.)"""
    from transgqla.verify import run_verify

    SECTIONS = ["structure", "fidelity", "decode"]

    monkeypatch.setenv(LAYER_WORKERS_ENV, "0")
    want = run_verify(converted, source=str(calib_source[0]), device="cpu", tokens=8, seqlen=64, checks=SECTIONS)
    accept_the_fake_device(monkeypatch)
    with FakeDevice():
        got = run_verify(converted, source=str(calib_source[0]), device=DEV, tokens=8, seqlen=64, checks=SECTIONS)
    assert got.ok and want.ok
    for a, b in zip(want.checks, got.checks, strict=True):
        assert a.name == b.name and a.ok == b.ok
        if isinstance(a.value, float):
            assert b.value == pytest.approx(a.value, rel=1e-4, abs=1e-9), a.name
        else:
            assert b.value == a.value, a.name
