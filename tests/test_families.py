"""Mixtral, Phi-3 and Gemma2 end to end, each against the stock transformers model of its family.

For each family: the source reference decoder reproduces stock logits; an MQA source converted at
full rank with ``d_R = d`` reproduces them on both decode paths, in the reference decoder and in the
shipped remote-code runtime (cached ``generate()`` included), with every copied tensor (experts,
router, fused ``gate_up_proj``, the extra norms) byte for byte; the two paths agree at a lossy rank;
the stock-format exports refuse what they cannot carry with one line. Tiny random checkpoints written
by transformers' own classes (``save_pretrained``), no network.
"""

from __future__ import annotations

import json

import pytest
import torch

from transgqla.errors import UnsupportedError
from transgqla.model.decoder import SourceDecoder

from helpers import load_decoder, load_tensors, rel_err, run_convert

IDS = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(3))
FAMILY_KW = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phi3": dict(pad_token_id=0),
    # windows of 6 tokens on alternate layers, so the 17-token prompts see both kinds of layer
    "gemma2": dict(sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
    "granite": dict(attention_multiplier=0.11, embedding_multiplier=3.0, residual_multiplier=0.4, logits_scaling=2.5),
}
NEW = list(FAMILY_KW)
COPIED = {  # a tensor per family that conversion must pass through byte for byte
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"],
    "phi3": ["model.layers.1.mlp.gate_up_proj.weight"],
    "gemma2": ["model.layers.1.pre_feedforward_layernorm.weight", "model.layers.1.post_feedforward_layernorm.weight",
               "model.layers.0.post_attention_layernorm.weight"],
    "granite": ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"],
}


def _source(source_factory, family, **kw):
    return source_factory(family, **{**FAMILY_KW[family], **kw})


def _stock_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("family", NEW)
def test_source_reference_decoder_matches_stock(source_factory, family):
    src, model = _source(source_factory, family)
    cfg = json.loads((src / "config.json").read_text())
    dec = SourceDecoder(cfg, load_tensors(src), dtype=torch.float64)
    assert rel_err(dec.forward(IDS, dec.new_cache()), _stock_logits(model)) < 1e-5


def _raw_bytes(folder, name):
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index[name], "pt") as f:
        t = f.get_tensor(name)
    return t.dtype, t.contiguous().view(torch.uint8).flatten()


@pytest.mark.parametrize("family", NEW)
def test_mqa_full_rank_is_exact_in_the_reference_and_the_runtime(source_factory, tmp_path, family):
    from transformers import AutoModelForCausalLM

    src, model = _source(source_factory, family, n_kv=1, n_heads=4, head_dim=16)
    out = tmp_path / "out"
    run_convert(src, out, qk_rope_dim=16, freqfold="1", kv_lora_rank=16)
    ref = _stock_logits(model)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gqla"]["family"]["name"] == family
    dec = load_decoder(out)
    for path in ("absorb", "gqa"):
        assert rel_err(dec.forward(IDS, dec.new_cache(path)), ref) < 1e-5, path
    for name in COPIED[family]:
        a, b = _raw_bytes(src, name), _raw_bytes(out, name)
        assert a[0] == b[0] and torch.equal(a[1], b[1]), name
    for path in ("absorb", "gqa"):
        rt, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, decode_path=path,
                                                        dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            assert rel_err(rt(IDS).logits, ref) < 1e-4, path
            want = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
            got = rt.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
        assert torch.equal(got, want), path


@pytest.mark.parametrize("family", NEW)
def test_paths_agree_at_a_lossy_rank(source_factory, tmp_path, family):
    from transformers import AutoModelForCausalLM

    src, model = _source(source_factory, family, n_kv=2)
    out = tmp_path / "out"
    run_convert(src, out, qk_rope_dim=8, freqfold="2", kv_lora_rank=20)
    dec = load_decoder(out)
    absorb, gqa = (dec.forward(IDS, dec.new_cache(p)) for p in ("absorb", "gqa"))
    assert rel_err(absorb, gqa) < 1e-10
    assert 1e-6 < rel_err(absorb, _stock_logits(model)) < 0.9  # lossy, but the same model
    rt = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        a, g = rt(IDS, decode_path="absorb").logits, rt(IDS, decode_path="gqa").logits
    assert rel_err(a, g) < 1e-5
    assert rel_err(a, absorb) < 1e-5


@pytest.mark.parametrize("family", NEW)
def test_stock_exports_refuse_the_block_with_one_line(source_factory, tmp_path, family):
    from transgqla.export import ExportRequest, export

    src, _ = _source(source_factory, family, n_kv=2)
    out = tmp_path / "out"
    run_convert(src, out, qk_rope_dim=8, freqfold="2", kv_lora_rank=20)
    for fmt, path in (("deepseek", "absorb"), ("mimo", "gqa")):
        with pytest.raises(UnsupportedError) as err:
            export(ExportRequest(out=out, dst=tmp_path / f"dst-{fmt}", path=path, format=fmt))
        assert "\n" not in str(err.value) and family in str(err.value), str(err.value)
        assert not (tmp_path / f"dst-{fmt}").exists()
    if family == "gemma2":
        assert "soft-capping" in str(err.value)
    result = export(ExportRequest(out=out, dst=tmp_path / "dst-gqla", path="gqa"))  # the GQLA format carries any family
    assert result.ok
    for check in ("full", "layerwise"):  # per-group k_proj/v_proj, checked against the reference both ways
        folded = export(ExportRequest(out=out, dst=tmp_path / f"dst-fold-{check}", path="gqa", fold_kv=True,
                                      check=check))
        assert folded.ok and folded.check.mode == check, (check, folded.check)


@pytest.mark.parametrize("family", NEW)
def test_calibrated_convert_verify_and_eval_ppl(source_factory, tmp_path, family):
    from transgqla.evaluate import perplexity
    from transgqla.verify import run_verify

    from test_calibration import make_tokenizer, tiny_text

    src, _ = _source(source_factory, family, n_kv=2)
    make_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(1500))
    out = tmp_path / "out"
    result = run_convert(src, out, qk_rope_dim=8, kv_lora_rank=24, calib=[str(text)], calib_tokens=512,
                         calib_seqlen=32, refine=3)
    assert result.plan.settings.method == "gqla" and len(result.layer_reports) == 2
    report = run_verify(out, source=str(src), text=text, tokens=4, seqlen=32, device="cpu")
    assert report.ok, [(c.name, c.message) for c in report.checks if not c.ok]
    ppl_src = perplexity(str(src), [str(text)], seqlen=32, max_tokens=256)
    ppl_out = perplexity(str(out), [str(text)], seqlen=32, max_tokens=256, path="gqa")
    assert ppl_src.tokens == ppl_out.tokens > 0
    assert 1.0 < ppl_src.perplexity < 1e4 and 1.0 < ppl_out.perplexity < 1e4
    fid = report.get("fidelity.perplexity").details
    assert fid["ppl_source"] == pytest.approx(perplexity(str(src), [str(text)], seqlen=32).perplexity, rel=1e-5)


def _config(arch: str, **kw) -> dict:
    return {"architectures": [arch], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 101, "intermediate_size": 112, "rope_theta": 10000.0, **kw}


@pytest.mark.parametrize("arch, extra, words", [
    ("Phi3ForCausalLM", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("Phi3ForCausalLM", {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
     "longrope"),
    ("Qwen3ForCausalLM", {}, "QK-norm"),
    ("Gemma3ForCausalLM", {}, "QK-norm"),
    ("LlamaForCausalLM", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
])
def test_what_a_family_cannot_express_is_refused_with_one_line(arch, extra, words):
    from transgqla.source_geometry import read_geometry

    with pytest.raises(UnsupportedError) as err:
        read_geometry(_config(arch, **extra))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_block_record_round_trips_and_names_every_weight():
    from transgqla.families import Block, family_for

    cfg = _config("MixtralForCausalLM", num_local_experts=3, num_experts_per_tok=2, sliding_window=8)
    block = family_for(cfg).block(cfg)
    assert Block.from_record(json.loads(json.dumps(block.record()))) == block
    names = block.copied_weights(2, 101, 64, 112)
    assert names["model.layers.1.block_sparse_moe.experts.2.w3.weight"] == (112, 64)
    assert names["model.layers.0.block_sparse_moe.gate.weight"] == (3, 64)
    assert block.layer_windows == (8, 8)
    gemma = _config("Gemma2ForCausalLM", sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    tie_word_embeddings=True)
    g = family_for(gemma).block(gemma)
    assert g.layer_windows == (4, None) and "lm_head.weight" not in g.copied_weights(2, 101, 64, 112)
    assert g.norms() == ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm")
