"""transgqla/format.py against DESIGN.md section 4 (shapes worked out by hand), and the checkpoint convert writes
against the format: every attention tensor the config implies, with its shape, and nothing else."""

from __future__ import annotations

import json

from transgqla.format import (
    DEFAULT_SHARD_BYTES,
    MANIFEST,
    REMOTE_CODE,
    AttentionDims,
    attention_tensors,
    config_problems,
    converted_names,
)
from transgqla.io import SafetensorsCheckpoint

from helpers import run_convert


def test_the_layout_table_by_hand():
    # Llama-3-8B at the paper's point: D 4096, 32 heads, 8 groups of 128, r 512, d_R 64.
    dims = AttentionDims(hidden=4096, n_heads=32, n_groups=8, d_nope=128, d_rope=64, d_v=128, rank=512)
    assert dims.shapes() == {
        "q_proj.weight": (32 * 192, 4096), "kv_a_proj_with_mqa.weight": (576, 4096),
        "kv_b_proj.weight": (8 * 256, 512), "o_proj.weight": (4096, 4096),
        "q_proj.bias": (6144,), "kv_a_proj_with_mqa.bias": (576,), "kv_b_proj.bias": (2048,), "o_proj.bias": (4096,),
    }
    assert dims.config_keys() == {"kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
                                  "qk_rope_head_dim": 64, "v_head_dim": 128, "num_key_value_heads": 8}
    assert converted_names(False) == ["q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight"]
    assert DEFAULT_SHARD_BYTES == 5 * 10**9


def test_biases_follow_the_config():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "qk_nope_head_dim": 16,
           "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 24}
    required, optional = attention_tensors({**cfg, "attention_bias": True, "o_proj_bias": False})
    assert "kv_b_proj.bias" in required and "o_proj.bias" not in required and not optional
    required, optional = attention_tensors(cfg)  # no o_proj_bias key: an o_proj bias may be there or not
    assert not any(n.endswith(".bias") for n in required) and optional == {"o_proj.bias": (64,)}


def test_a_converted_checkpoint_is_what_the_format_says(source_factory, tmp_path):
    src, _ = source_factory("qwen2")  # attention biases: the widest layout
    out = tmp_path / "out"
    run_convert(src, out, kv_lora_rank=24, qk_rope_dim=8)
    cfg = json.loads((out / "config.json").read_text())
    assert config_problems(cfg) == []
    required, optional = attention_tensors(cfg)
    with SafetensorsCheckpoint(out) as ckpt:
        for layer in range(cfg["num_hidden_layers"]):
            prefix = f"model.layers.{layer}.self_attn."
            have = {n[len(prefix):]: tuple(ckpt.spec(n).shape) for n in ckpt.names if n.startswith(prefix)}
            assert {n: s for n, s in have.items() if n in required} == required
            assert set(have) <= set(required) | set(optional)
    assert (cfg["qk_rope_head_dim"], cfg["kv_lora_rank"], cfg["num_key_value_heads"]) == (8, 24, 2)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(REMOTE_CODE) <= set(files) and "config.json" in files


def test_config_problems_name_what_breaks_the_contract():
    problems = config_problems({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "qk_rope_head_dim": 7})
    text = "; ".join(problems)
    for expected in ("architectures is ['LlamaForCausalLM']", "model_type is 'llama'", "auto_map must name",
                     "required key kv_lora_rank is missing", "qk_rope_head_dim 7 must be even",
                     "required object gqla is missing"):
        assert expected in text, expected
