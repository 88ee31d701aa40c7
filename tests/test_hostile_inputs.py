"""Hostile and broken sources: each is refused with one `error:` line on stderr and a non-zero exit, and
nothing is written (no OUT, no staging folder). Remote code in a source is never imported."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from transgqla.cli.app import app

from conftest import make_source

runner = CliRunner()
SMALL = ["--kv-lora-rank", "24", "--qk-rope-dim", "8"]


@pytest.fixture(scope="module")
def base_src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "base"
    make_source(folder, "llama", layers=2)  # 24 KB source shards: layers straddle files
    return folder


@pytest.fixture
def src(base_src, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(base_src, folder)
    return folder


def refused(src: Path, *extra, code: int = 2, source: str | None = None) -> str:
    """Run convert, check the exit code, the single error line and that nothing was written."""
    out = src.parent / "out"
    r = runner.invoke(app, ["convert", source or str(src), str(out), *map(str, extra)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not out.exists()
    assert not (src.parent / ".out.transgqla-partial").exists()
    return lines[0]


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


def replace_tensor(src: Path, name: str, fn) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


# -- broken files -----------------------------------------------------------------------


def test_truncated_shard(src):
    shard = shards(src)[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = refused(src, *SMALL)
    assert "truncated" in line and shard.name in line


@pytest.mark.parametrize("header", [b"{not json", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}'])
def test_corrupt_safetensors_header(src, header):
    shard = shards(src)[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    padded = header.ljust(n, b" ")  # same length: only the header's content is wrong
    shard.write_bytes(data[:8] + padded + data[8 + n :])
    line = refused(src, *SMALL)
    assert shard.name in line and ("corrupt header" in line or "missing from shard" in line)


def test_absurd_header_length(src):
    shard = shards(src)[0]
    shard.write_bytes((1 << 60).to_bytes(8, "little") + shard.read_bytes()[8:])
    assert "corrupt header" in refused(src, *SMALL)


def test_config_is_not_json(src):
    (src / "config.json").write_text("{oops")
    assert "not valid JSON" in refused(src, *SMALL)


@pytest.mark.parametrize("target,words", [
    ("../../outside.safetensors", "escapes"),
    ("/etc/passwd", "escapes"),
    ("model-00099-of-00099.safetensors", "does not exist"),
])
def test_index_names_a_bad_file(src, target, words):
    (src.parent.parent / "outside.safetensors").write_bytes(shards(src)[0].read_bytes())
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = target
    index_path.write_text(json.dumps(index))
    assert words in refused(src, *SMALL)


# -- tensors that disagree with the config ---------------------------------------------------


@pytest.mark.parametrize("name", [
    "model.layers.1.self_attn.k_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.embed_tokens.weight",
])
def test_tensor_with_wrong_shape(src, name):
    replace_tensor(src, name, lambda t: t[:-1].clone())
    line = refused(src, *SMALL)
    assert name in line and "the config implies" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_attention_weights(src, value):
    """Found while converting layer 1, after output shards were written: the staging folder goes too."""
    def poison(t):
        t = t.clone()
        t[3, 5] = value
        return t

    replace_tensor(src, "model.layers.1.self_attn.v_proj.weight", poison)
    line = refused(src, *SMALL, "--max-shard-size", "0.00002")
    assert "model.layers.1.self_attn.v_proj.weight holds NaN or Inf" in line


def test_layers_beyond_the_config(src):
    edit_config(src, num_hidden_layers=1)
    assert "num_hidden_layers = 1, but the tensors hold 2 layers" in refused(src, *SMALL)


# -- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "num_hidden_layers"])
def test_config_missing_required_key(src, key):
    edit_config(src, **{key: ...})
    assert f"missing required keys: {key}" in refused(src, *SMALL)


@pytest.mark.parametrize("changes,words", [
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"num_key_value_heads": 8}, "not a multiple of num_key_value_heads 8"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
    ({"num_attention_heads": "4"}, "'num_attention_heads' must be a positive integer"),
    ({"rope_parameters": {"rope_theta": "fast", "rope_type": "default"}}, "unreadable RoPE settings"),
    ({"rope_parameters": {"rope_theta": -1.0, "rope_type": "default"}}, "rope_theta must be a finite number"),
    ({"architectures": "LlamaForCausalLM"}, "exactly one architecture"),
])
def test_config_inconsistent(src, changes, words):
    edit_config(src, **changes)
    assert words in refused(src, *SMALL)


def test_odd_head_dim(src):
    edit_config(src, head_dim=15)
    assert "head_dim 15 is odd" in refused(src, *SMALL)


# -- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1000, 57, 0, -3])
def test_rank_out_of_range(src, rank):
    line = refused(src, "--kv-lora-rank", rank, "--qk-rope-dim", 8)
    assert "--kv-lora-rank" in line and "1..56" in line


@pytest.mark.parametrize("rope", [24, 32, 6, 3, 0])
def test_rope_dim_must_divide_head_dim(src, rope):
    line = refused(src, "--kv-lora-rank", 24, "--qk-rope-dim", rope)
    assert f"--qk-rope-dim {rope} must be even and divide head_dim 16" in line


def test_zero_shard_size(src):
    assert "--max-shard-size" in refused(src, *SMALL, "--max-shard-size", 0)


# -- sources that are not local folders -------------------------------------------------------


def test_model_id_not_resolvable_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    line = refused(tmp_path / "nowhere", *SMALL, source="transgqla-test/does-not-exist")
    assert "cannot resolve model 'transgqla-test/does-not-exist' offline" in line
    assert not (tmp_path / "hf-home" / "hub" / "models--transgqla-test--does-not-exist" / "snapshots").exists()


# -- remote code ----------------------------------------------------------------------------


EVIL = """
from pathlib import Path
Path({flag!r}).write_text("remote code ran")
"""


def _plant_remote_code(src: Path, architecture: str) -> Path:
    flag = src.parent / "PWNED"
    for mod in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (src / f"{mod}.py").write_text(EVIL.format(flag=str(flag)))
    edit_config(src, architectures=[architecture], auto_map={
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
    })
    return flag


def _no_remote_code_ran(flag: Path) -> None:
    assert not flag.exists()
    assert not any(m in sys.modules for m in ("modeling_evil", "configuration_evil", "tokenization_evil"))


def test_remote_code_with_unknown_architecture_is_refused(src):
    flag = _plant_remote_code(src, "EvilForCausalLM")
    line = refused(src, *SMALL, code=3)
    assert "EvilForCausalLM is not supported" in line
    _no_remote_code_ran(flag)


def test_remote_code_with_known_architecture_converts_without_running_it(src, tmp_path):
    flag = _plant_remote_code(src, "LlamaForCausalLM")
    out = tmp_path / "out"
    r = runner.invoke(app, ["convert", str(src), str(out), *SMALL])
    assert r.exit_code == 0, r.output
    _no_remote_code_ran(flag)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_gqla.GQLAConfig",
                               "AutoModelForCausalLM": "modeling_gqla.GQLAForCausalLM"}
    assert not any("evil" in p.name for p in out.iterdir())


# -- sources a conversion would get silently wrong -----------------------------------------


def test_quantization_config_is_refused_with_a_hint_to_dequantize(src):
    edit_config(src, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    line = refused(src, *SMALL, code=3)
    assert "quantized" in line and "fp8" in line and "dequantize" in line


def test_fp8_weights_with_scales_are_refused_even_without_quantization_config(src):
    """Casting the raw FP8 codes (``--dtype bfloat16``) would produce garbage: refused up front."""
    import torch

    name = "model.layers.0.self_attn.k_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    tensors[name.replace(".weight", ".weight_scale_inv")] = torch.ones(1, 1)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"][name.replace(".weight", ".weight_scale_inv")] = index["weight_map"][name]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(src, *SMALL, "--dtype", "bfloat16", code=3)
    assert "quantized" in line and "dequantize" in line


def test_a_scale_tensor_alone_is_refused(src):
    import torch

    name = "model.layers.1.mlp.down_proj.weight"
    replace_tensor(src, name, lambda t: t)  # rewrite the shard with one more tensor below
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.input_scale"] = torch.ones(1)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.1.mlp.down_proj.input_scale"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = refused(src, *SMALL, code=3)
    assert "input_scale" in line and "dequantize" in line


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_dynamic_rope_scaling_is_refused(src, spelling):
    if spelling == "rope_scaling":
        edit_config(src, rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_parameters=...)
    else:
        edit_config(src, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, rope_scaling=...)
    line = refused(src, *SMALL, code=3)
    assert "dynamic" in line and "original_max_position_embeddings" in line
