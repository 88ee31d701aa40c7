"""Exports padded for engines: ``--kernel-shape R+DR`` (DeepSeek) and ``--equal-kv`` (MiMo).

Both are zero paddings that must change nothing: stock transformers on the padded export (no remote code) must
reproduce the GQLA reference on the unpadded OUT (logits and cached ``generate()`` tokens), the padded tensors
must hold OUT's values in their new slots and zeros elsewhere, the cost in cache must be stated, and shapes no
padding can reach must be refused in one line. ``verify`` on a padded DeepSeek export names the kernels that
run it, vLLM's CPU MLA kernel among them.
"""

from __future__ import annotations

import json

import pytest
import torch

from transgqla.export.kernel_pad import parse_kernel_shape
from transgqla.io import SafetensorsCheckpoint

from helpers import load_tensors
from test_export import _deepseek_vs_reference, export_json, gqla, invoke, nothing_at, one_line_error  # noqa: F401
from test_export_mimo import against_reference


def test_kernel_shape_pads_exactly(gqla, tmp_path):
    out, dst = gqla("llama"), tmp_path / "ds"  # 24 + 8, head dim 16, llama3 rope scaling
    doc = export_json(out, dst, "--path", "absorb", "--format", "deepseek", "--kernel-shape", "512+64")
    pad = doc["kernel_padding"]
    assert doc["ok"] and doc["cache_values_per_token"] == 576 and pad["cache_values_per_token_unpadded"] == 32
    assert pad["to"] == {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 128}
    assert pad["cache_cost"] == 18.0 and pad["source_cache_values_per_token"] == 64
    assert any("cache holds 576 values/token/layer instead of 32" in w for w in doc["warnings"])
    assert doc["engines"]["kernels"]["vLLM CPU MLA"] and doc["engines"]["kernels"]["FlashMLA"]
    assert doc["engines"]["vllm_prefill_accepts"] and doc["engines"]["advice"] == ""
    err = _deepseek_vs_reference(out, dst, 1e-5)  # stock DeepseekV3ForCausalLM against GQLADecoder on OUT
    print(f"kernel-shape 512+64 from 24+8: relative logit error {err:.2e}")
    # the layout: OUT's RoPE-key pair p sits in slot 8p, the padded latent rows are zero
    a = load_tensors(out)["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    with SafetensorsCheckpoint(dst) as ck:
        b = ck.read("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        kv_b = ck.read("model.layers.0.self_attn.kv_b_proj.weight")
    rope = b[512:].view(32, 2, -1)
    assert torch.equal(rope[::8].reshape(8, -1), a[24:]) and not rope[1::8].any() and not b[24:512].any()
    assert kv_b.shape == (4 * (64 + 128), 512) and not kv_b[:, 24:].any()


def test_verify_names_the_kernels_of_a_padded_export(gqla, tmp_path):
    dst = tmp_path / "ds"
    export_json(gqla("llama"), dst, "--path", "absorb", "--format", "deepseek", "--kernel-shape", "512+64")
    from transgqla.verify import run_verify

    report = run_verify(dst, device="cpu")
    checks = {c.name: c for c in report.checks}
    assert checks["engines.decode.vLLM_CPU_MLA"].value is True
    assert checks["engines.decode.FlashMLA"].value is True and checks["engines.vllm_prefill"].value is True
    assert checks["export.reference"].ok, checks["export.reference"].message


@pytest.mark.parametrize("shape, words", [
    ("16+8", "smaller than the checkpoint's 24+8"),
    ("512+12", "cannot spread evenly over 12"),
    ("512+4", "smaller than the checkpoint's 24+8"),
])
def test_unreachable_kernel_shapes_refused(gqla, tmp_path, shape, words):
    dst = tmp_path / "ds"
    r = invoke("export", gqla("llama"), dst, "--path", "absorb", "--format", "deepseek", "--kernel-shape", shape)
    assert r.exit_code == 3 and words in one_line_error(r) and nothing_at(dst)


@pytest.mark.parametrize("flags", [("--kernel-shape", "512"), ("--kernel-shape", "512+63"),
                                   ("--format", "mimo", "--path", "gqa", "--kernel-shape", "512+64"),
                                   ("--format", "deepseek", "--target", "transformers", "--kernel-shape", "512+64"),
                                   ("--format", "deepseek", "--equal-kv")])
def test_padding_flag_misuse(gqla, tmp_path, flags):
    dst = tmp_path / "ds"
    base = ("--path", "absorb", "--format", "deepseek") if "--path" not in flags else ()
    r = invoke("export", gqla("llama"), dst, *base, *flags)
    assert r.exit_code == 2 and one_line_error(r) and nothing_at(dst)


def test_parse_kernel_shape():
    assert parse_kernel_shape("512+64") == (512, 64) and parse_kernel_shape(" 256 + 32 ") == (256, 32)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_equal_kv_pads_values_exactly(gqla, tmp_path, name):
    out, dst = gqla(name), tmp_path / "mimo"  # head dim 16, d_R 8: keys 24, values 16 -> 24
    doc = export_json(out, dst, "--path", "gqa", "--format", "mimo", "--equal-kv")
    assert doc["ok"] and doc["equal_kv"] and doc["cache_values_per_token"] == 2 * 2 * 24
    assert doc["cache_values_per_token_unpadded"] == 2 * (24 + 16) and doc["source_cache_values_per_token"] == 64
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["head_dim"] == cfg["v_head_dim"] == 24
    with SafetensorsCheckpoint(dst) as ck:
        v = ck.read("model.layers.0.self_attn.v_proj.weight").view(2, 24, -1)
        o = ck.read("model.layers.0.self_attn.o_proj.weight").view(-1, 4, 24)
    assert not v[:, 16:].any() and not o[..., 16:].any()
    assert torch.equal(o[..., :16].reshape(o.shape[0], -1), load_tensors(out)["model.layers.0.self_attn.o_proj.weight"])
    err = against_reference(out, dst, 1e-5)  # stock MiMoV2FlashForCausalLM against GQLADecoder (gqa path)
    print(f"mimo --equal-kv ({name}): relative logit error {err:.2e}")
