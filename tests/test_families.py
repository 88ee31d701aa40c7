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

from helpers import load_decoder, load_tensors, rel_err, run_convert
from transgqla.errors import UnsupportedError
from transgqla.model.decoder import SourceDecoder

IDS = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(3))
FAMILY_KW = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phi3": dict(pad_token_id=0),
    # windows of 6 tokens on alternate layers, so the 17-token prompts see both kinds of layer
    "gemma2": dict(sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh"),
}
NEW = list(FAMILY_KW)
COPIED = {  # a tensor per family that conversion must pass through byte for byte
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight"],
    "phi3": ["model.layers.1.mlp.gate_up_proj.weight"],
    "gemma2": ["model.layers.1.pre_feedforward_layernorm.weight", "model.layers.1.post_feedforward_layernorm.weight",
               "model.layers.0.post_attention_layernorm.weight"],
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
