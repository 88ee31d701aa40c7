"""What convert writes: the format contract, byte-identical pass-through, a truthful index and manifest,
and bit-identical output across runs."""

import hashlib
import json

import pytest

from transgqla.io import SafetensorsCheckpoint

from helpers import run_convert


@pytest.fixture
def converted(source_factory, tmp_path):
    src, _ = source_factory("qwen2", n_kv=2, n_heads=4, head_dim=16, layers=3)
    out = tmp_path / "out"
    run_convert(src, out, qk_rope_dim=8, kv_lora_rank=32)
    return src, out


def test_contract_shapes_and_config(converted):
    src, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GQLAForCausalLM"] and cfg["model_type"] == "gqla"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_gqla.GQLAForCausalLM"
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (32, 8, 16, 16)
    assert cfg["q_lora_rank"] is None and cfg["rope_interleave"] is True and cfg["num_key_value_heads"] == 2
    g = cfg["gqla"]
    assert g["format_version"] == 1 and g["decode_path"] == "absorb"
    assert g["cache_values_per_token"]["absorb"] == 40 and g["cache_values_per_token"]["source_gqa"] == 64
    assert len(g["layers"]) == 3 and g["source"]["architecture"] == "Qwen2ForCausalLM"
    ck = SafetensorsCheckpoint(out)
    p = "model.layers.1.self_attn."
    assert ck.spec(p + "q_proj.weight").shape == (4 * (16 + 8), 64)
    assert ck.spec(p + "kv_a_proj_with_mqa.weight").shape == (32 + 8, 64)
    assert ck.spec(p + "kv_b_proj.weight").shape == (2 * (16 + 16), 32)
    assert ck.spec(p + "kv_b_proj.bias").shape == (2 * 32,)
    assert not any(".k_proj." in n or ".v_proj." in n for n in ck.names)


def test_non_attention_tensors_are_byte_identical(converted):
    src, out = converted
    a, b = SafetensorsCheckpoint(src), SafetensorsCheckpoint(out)
    passthrough = [n for n in a.names if not any(f".{x}_proj." in n for x in "qkv")]
    assert "model.layers.2.self_attn.o_proj.weight" in passthrough
    for name in passthrough:
        assert a.read_bytes(name) == b.read_bytes(name), name
        assert a.spec(name) == b.spec(name)


def test_index_lists_exactly_the_written_tensors_and_manifest_is_true(converted):
    _, out = converted
    index = json.loads((out / "model.safetensors.index.json").read_text())
    in_headers = {}
    for shard in set(index["weight_map"].values()):
        raw = (out / shard).read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        in_headers.update({k: shard for k in header if k != "__metadata__"})
    assert in_headers == index["weight_map"]
    manifest = json.loads((out / "transgqla-manifest.json").read_text())
    files = {p.name for p in out.iterdir()} - {"transgqla-manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_output_is_bit_identical_across_runs(source_factory, tmp_path):
    src, _ = source_factory("llama", n_kv=2, layers=2, dtype=__import__("torch").bfloat16)
    run_convert(src, tmp_path / "a", qk_rope_dim=8, kv_lora_rank=24)
    run_convert(src, tmp_path / "b", qk_rope_dim=8, kv_lora_rank=24)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    assert SafetensorsCheckpoint(tmp_path / "a").spec("model.layers.0.self_attn.q_proj.weight").dtype == "BF16"
