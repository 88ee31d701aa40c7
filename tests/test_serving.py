"""Which path a server runs (``transgqla.serving``, the rule the vLLM plugin applies) and what it refuses.

Pure: no vLLM needed. The plugin itself is run in vLLM by tests/test_vllm.py.
"""

from __future__ import annotations

import pytest

from transgqla.families.base import Block, Mlp
from transgqla.serving import auto_path, gpu_row, requested_path, resolve_path, unsupported_block


def cfg(rank=512, d_rope=64, path="absorb", **extra):
    base = {"kv_lora_rank": rank, "qk_rope_head_dim": d_rope, "qk_nope_head_dim": 128, "v_head_dim": 128,
            "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "vocab_size": 128256,
            "num_hidden_layers": 32, "intermediate_size": 14336, "model_type": "gqla",
            "gqla": {"format_version": 1, "decode_path": path}}
    base.update(extra)
    return base


def test_override_wins_over_the_config():
    assert resolve_path(cfg(path="gqa"), "cpu") == ("gqa", "config gqla.decode_path")
    assert resolve_path(cfg(path="gqa", gqla_decode_path="absorb"), "cpu") == ("absorb", "hf_overrides")
    with pytest.raises(ValueError, match="gqla_decode_path must be one of"):
        requested_path(cfg(gqla_decode_path="mla"))


def test_auto_on_cpu_follows_the_cpu_mla_kernel():
    assert auto_path(cfg(), "cpu")[0] == "absorb"  # 512 + 64: vLLM's CPU MLA kernel
    path, why = auto_path(cfg(rank=96, d_rope=32), "cpu")
    assert path == "gqa" and "512 + 64" in why


def test_auto_on_a_gpu_is_the_planners_pick():
    from transgqla.plan import GPUS, Workload, plan, shape_from_config

    for name, sq in (("NVIDIA H100 80GB HBM3", 1), ("NVIDIA H20", 4), ("NVIDIA H200", 2)):
        gpu = gpu_row(name)
        want = plan(shape_from_config(cfg()), gpu, Workload(sq=sq))["recommended"]
        assert auto_path(cfg(), "cuda", name, sq=sq)[0] == want
    assert gpu_row("NVIDIA H200") is GPUS["h200"] and gpu_row("NVIDIA H20") is GPUS["h20"]
    assert auto_path(cfg(), "cuda", "NVIDIA H20", sq=4)[0] == "gqa"  # the roofline's H20 crossover (README)
    assert auto_path(cfg(), "cuda", "Some Future GPU")[0] == "absorb"


@pytest.mark.parametrize("block, words", [
    (Block("mixtral", mlp=Mlp(kind="moe", module="block_sparse_moe", router="gate", experts="experts", gate="w1",
                              up="w3", down="w2", n_experts=4, top_k=2)), "a mixture of 4 experts"),
    (Block("gemma2", attn_softcap=50.0, final_softcap=30.0, norm_offset=1.0, embed_scale=True,
           attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm"), "attention-logit soft-capping"),
    (Block("llama", activation="gelu"), "silu only"),
])
def test_families_beyond_llama_refused_in_one_line(block, words):
    msg = unsupported_block(cfg(gqla={"format_version": 1, "decode_path": "absorb", "family": block.record()}))
    assert msg and words in msg and "\n" not in msg


def test_llama_and_qwen2_blocks_are_served():
    assert unsupported_block(cfg()) is None
    assert unsupported_block(cfg(gqla={"format_version": 1, "family": Block("qwen2").record()})) is None
    v2 = unsupported_block(cfg(gqla={"format_version": 2}))
    assert v2 and "format_version 2" in v2
