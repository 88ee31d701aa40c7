"""``export --path gqa --format mimo``: the GQA path as a stock MiMo-V2-Flash checkpoint.

Stock ``MiMoV2FlashForCausalLM`` (``AutoModelForCausalLM``, no remote code) must reproduce the GQLA
reference's GQA path: logits and cached ``generate()`` tokens, with Llama-3 RoPE scaling, with Qwen2's
q/k/v biases, and in bfloat16 within rounding. The RoPE row permutation is checked against stock
transformers' own rotary code.
"""

from __future__ import annotations

import json

import pytest
import torch

from transgqla.export.mimo import rope_first, rotary_factor
from transgqla.io import SafetensorsCheckpoint
from transgqla.mathx.rope import cos_sin, interleaved_layout, inv_freq

from helpers import load_decoder, rel_err
from test_export import export_json, gqla, ids, invoke, nothing_at, one_line_error  # noqa: F401 (fixture)


def stock(dst, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, MiMoV2FlashForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dst, dtype=dtype)  # no trust_remote_code
    assert type(model) is MiMoV2FlashForCausalLM
    return model.eval()


def against_reference(out, dst, bound):
    model, ref = stock(dst), load_decoder(out, dtype=torch.float64)
    x = ids()
    with torch.no_grad():
        err = rel_err(model(x).logits, ref.forward(x, ref.new_cache("gqa")))
    assert err < bound, err
    prompt = x[:1, :6]
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(tokens, ref.generate(prompt, 16, "gqa"))
    return err


def test_mimo_llama3_scaling_stock_transformers(gqla, tmp_path):
    out, dst = gqla("llama"), tmp_path / "mimo"
    doc = export_json(out, dst, "--path", "gqa", "--format", "mimo")
    assert doc["ok"] and doc["check"]["greedy_tokens_equal"] and doc["cache_values_per_token"] == 2 * (16 + 8 + 16)
    assert any("vLLM's mimo_v2_flash applies plain RoPE" in w for w in doc["warnings"])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "mimo_v2_flash" and "auto_map" not in cfg and not list(dst.glob("*.py"))
    assert cfg["head_dim"] == 24 and cfg["v_head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    assert cfg["attention_value_scale"] == 1.0 and cfg["attention_bias"] is False
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["mlp_layer_types"] == ["dense"] * 2
    assert cfg["hybrid_layer_pattern"] == [0, 0] and cfg["moe_layer_freq"] == [0, 0]
    rope = cfg["rope_parameters"]["full_attention"]
    assert rope["rope_type"] == "llama3" and int(24 * rope["partial_rotary_factor"]) == 8
    with SafetensorsCheckpoint(dst) as ck:
        assert ck.spec("model.layers.0.self_attn.k_proj.weight").shape == (2 * 24, 64)
        assert not any("kv_" in n for n in ck.names)
    err = against_reference(out, dst, 1e-5)
    print(f"mimo float32 relative logit error {err:.2e}")


def test_mimo_carries_qwen2_biases(gqla, tmp_path):
    out, dst = gqla("qwen2"), tmp_path / "mimo"
    doc = export_json(out, dst, "--path", "gqa", "--format", "mimo")
    assert doc["ok"] and json.loads((dst / "config.json").read_text())["attention_bias"] is True
    with SafetensorsCheckpoint(dst) as ck:
        assert ck.spec("model.layers.1.self_attn.k_proj.bias").shape == (2 * 24,)
    against_reference(out, dst, 1e-5)


def test_mimo_bfloat16_within_rounding(gqla, tmp_path):
    doc = export_json(gqla("bf16"), tmp_path / "mimo", "--path", "gqa", "--format", "mimo")
    assert doc["ok"] and doc["check"]["rel_logit_error"] < 5e-3  # measured ~1e-3: k/v products rounded to bf16


def test_mimo_sliding_window_warns(gqla, tmp_path):
    doc = export_json(gqla("mistral"), tmp_path / "mimo", "--path", "gqa", "--format", "mimo")
    assert doc["ok"] and any("sliding_window 64" in w for w in doc["warnings"])


def test_verify_on_a_mimo_export_reruns_the_export_check(gqla, tmp_path):
    """verify on a MiMo DST says what it is and runs export's own check again against the OUT it came from;
    with OUT gone it says so instead of failing the GQLA structure checks."""
    import shutil

    from transgqla.verify import run_verify

    out = tmp_path / "out"
    shutil.copytree(gqla("llama"), out)
    dst = tmp_path / "mimo"
    export_json(out, dst, "--path", "gqa", "--format", "mimo")
    report = run_verify(dst, device="cpu")
    assert report.ok and report.info["sections"] == ["structure", "export"]
    assert (report.get("export.kind").value == "mimo_v2_flash"
            and "export's own check" in report.get("export.kind").message)
    ref = report.get("export.reference")
    assert ref.ok and ref.value <= ref.threshold and "greedy tokens equal" in ref.message
    shutil.rmtree(out)
    report = run_verify(dst, device="cpu")
    assert (report.ok and report.get("export.reference").ok is None
            and "not reachable" in report.get("export.reference").message)


def test_mimo_needs_gqa_path(gqla, tmp_path):
    r = invoke("export", gqla("llama"), tmp_path / "m", "--path", "absorb", "--format", "mimo")
    assert r.exit_code == 2 and "--format mimo writes the GQA path" in one_line_error(r) and nothing_at(tmp_path / "m")


@pytest.mark.parametrize("d_nope, d_rope", [(16, 8), (128, 64), (64, 32), (192, 64)])
def test_rope_first_matches_stock_rotary(d_nope, d_rope):
    """Scores q.k under GQLA's layout (nope, then interleaved RoPE at base^(-2p/d_R)) equal the scores of the
    permuted rows under stock MiMo-V2's partial rotary (first d_R dims, NeoX halves), at every position."""
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import apply_rotary_pos_emb

    torch.manual_seed(0)
    head = d_nope + d_rope
    w_q, w_k = torch.randn(3 * head, 40, dtype=torch.float64), torch.randn(head, 40, dtype=torch.float64)
    x = torch.randn(1, 7, 40, dtype=torch.float64)
    pos = torch.arange(7)
    freqs = inv_freq(d_rope, 10000.0)
    cos, sin = cos_sin(freqs, pos, dtype=torch.float64)

    def gqla_layout(w, n):
        z = (x @ w.T).view(1, 7, n, head).transpose(1, 2)
        return torch.cat((z[..., :d_nope], interleaved_layout(z[..., d_nope:], cos, sin)), dim=-1)

    want = gqla_layout(w_q, 3) @ gqla_layout(w_k, 1).transpose(-1, -2)
    q = (x @ rope_first(w_q, 3, d_nope, d_rope).T).view(1, 7, 3, head).transpose(1, 2)
    k = (x @ rope_first(w_k, 1, d_nope, d_rope).T).view(1, 7, 1, head).transpose(1, 2)
    stock_cos = torch.cat((cos, cos), dim=-1)[None]  # MiMo's rotary: emb = cat(freqs, freqs)
    stock_sin = torch.cat((sin, sin), dim=-1)[None]
    q, k = apply_rotary_pos_emb(q, k, stock_cos, stock_sin)
    assert torch.allclose(q @ k.transpose(-1, -2), want, rtol=1e-12, atol=1e-10)
    assert int(head * rotary_factor(head, d_rope)) == d_rope
