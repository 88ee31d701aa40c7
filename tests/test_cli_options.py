"""The options the commands share (cli/options.py) and the one error renderer (cli/render.py): sizes mean the same
bytes in the CLI and the library, every command refuses a bad --device the same way, errors are one line."""

import json

import pytest
from typer.testing import CliRunner

from transgqla.cli.app import app
from transgqla.cli.options import DEFAULT_SHARD_SIZE, parse_size
from transgqla.convert import ConvertRequest, convert
from transgqla.errors import InputError
from transgqla.export import ExportRequest
from transgqla.format import DEFAULT_SHARD_BYTES

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("text, size", [
    ("5GB", 5_000_000_000), ("500MB", 500_000_000), ("5GiB", 5 * 1024**3), ("500MiB", 500 * 1024**2),
    ("20KB", 20_000), ("20kib", 20_480), ("1.5 gb", 1_500_000_000), ("20000B", 20_000), ("1TB", 10**12),
    ("0.00002", 20_000), ("5", 5_000_000_000), ("2e-5GB", 20_000),
])
def test_sizes_are_decimal_unless_binary_and_bare_numbers_are_gb(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "GB", "five GB", "-1GB", "0", "0.1B", "5 G B", ""])
def test_bad_sizes_are_one_line_input_errors(text):
    with pytest.raises(InputError, match=r"^--max-shard-size ") as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_the_cli_default_is_the_library_default():
    assert parse_size(DEFAULT_SHARD_SIZE) == DEFAULT_SHARD_BYTES == 5 * 10**9
    assert ConvertRequest("x", "y").max_shard_bytes == DEFAULT_SHARD_BYTES
    assert ExportRequest("x", "y").max_shard_bytes == DEFAULT_SHARD_BYTES


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*"))}


def test_cli_and_library_write_the_same_shards_for_the_same_size(source_factory, tmp_path):
    src, _ = source_factory("llama")
    lib = tmp_path / "lib"
    convert(ConvertRequest(str(src), lib, kv_lora_rank=24, qk_rope_dim=8, max_shard_bytes=20_000))
    assert len(_shards(lib)) > 3  # the cap matters at this size
    for size in ("20KB", "0.00002", "20000B"):
        r = invoke("convert", src, tmp_path / size, "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--calib", "none",
                   "--max-shard-size", size)
        assert r.exit_code == 0, r.output
        assert _shards(tmp_path / size) == _shards(lib), size
    r = invoke("convert", src, tmp_path / "kib", "--kv-lora-rank", 24, "--qk-rope-dim", 8, "--calib", "none",
               "--max-shard-size", "10KiB")
    assert r.exit_code == 0, r.output
    index = json.loads((tmp_path / "kib" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > len(_shards(lib)) - 1  # smaller cap, more shards


def test_a_bad_size_is_refused_before_anything_is_written(source_factory, tmp_path):
    src, _ = source_factory("llama")
    r = invoke("convert", src, tmp_path / "out", "--max-shard-size", "5XB", "--json")
    assert r.exit_code == 2 and "--max-shard-size" in one_line_error(r)
    assert json.loads(r.stdout) == {"ok": False, "error": one_line_error(r)[len("error: "):], "exit_code": 2}
    assert not list(tmp_path.glob("*out*"))


@pytest.mark.parametrize("command", [
    ["convert", "{src}", "{tmp}/out"], ["eval-ppl", "{src}", "--text", "builtin:eval"], ["verify", "{tmp}"],
    ["export", "{tmp}", "{tmp}/dst", "--path", "absorb"], ["plan", "{src}", "--bench"],
])
def test_every_command_refuses_a_bad_device_in_one_line(source_factory, tmp_path, command):
    src, _ = source_factory("llama")
    args = [a.format(src=src, tmp=tmp_path) for a in command]
    r = invoke(*args, "--device", "tpu")
    assert r.exit_code == 2 and "--device must be one of auto, cpu, cuda" in one_line_error(r), r.output


def test_error_messages_are_printed_verbatim_not_as_markup(tmp_path):
    missing = tmp_path / "[bold]not-there[/bold]"
    r = invoke("convert", missing, tmp_path / "out")
    assert r.exit_code == 2 and "[bold]not-there[/bold]" in one_line_error(r)
