"""Where theory says the conversion is exact, the converted model reproduces stock transformers' logits.

An MQA source (one KV group) with every RoPE dimension kept (``d_R = d``, FreqFold 1) and full rank
loses nothing; neither does a GQA source whose groups share their key weights (RoRoPE concentrates
all key energy in one component per frequency). The reference is the stock transformers model.
"""

import pytest
import torch

from helpers import load_decoder, rel_err, run_convert

IDS = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))


def _check(src_model, out, tol=1e-4):
    with torch.no_grad():
        ref = src_model(IDS).logits
    dec = load_decoder(out)
    for path in ("absorb", "gqa"):
        got = dec.forward(IDS, dec.new_cache(path))
        assert rel_err(got, ref) < tol, path


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_mqa_source_full_rank_is_exact(source_factory, tmp_path, family):
    src, model = source_factory(family, n_kv=1, n_heads=4, head_dim=16)
    result = run_convert(src, tmp_path / "out", qk_rope_dim=16, freqfold="1", kv_lora_rank=16)
    assert result.plan.settings.kv_lora_rank == 16
    _check(model, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_source_with_shared_keys_is_exact(source_factory, tmp_path, family):
    src, model = source_factory(family, n_kv=2, n_heads=4, head_dim=16, shared_keys=True)
    run_convert(src, tmp_path / "out", qk_rope_dim=16, freqfold="1", kv_lora_rank=2 * 2 * 16 - 16)
    _check(model, tmp_path / "out")


def test_llama3_rope_scaling_is_carried(source_factory, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    src, model = source_factory("llama", n_kv=1, rope_parameters=scaling)
    run_convert(src, tmp_path / "out", qk_rope_dim=16, freqfold="1", kv_lora_rank=16)
    _check(model, tmp_path / "out")


def test_lossy_conversion_is_close_but_not_exact(source_factory, tmp_path):
    """A sanity bound, not exactness: half the RoPE dims and a reduced rank change the logits a little."""
    src, model = source_factory("llama", n_kv=2)
    run_convert(src, tmp_path / "out", qk_rope_dim=8, freqfold="2", kv_lora_rank=40)
    with torch.no_grad():
        ref = model(IDS).logits
    dec = load_decoder(tmp_path / "out")
    err = rel_err(dec.forward(IDS, dec.new_cache("absorb")), ref)
    assert 1e-6 < err < 0.5
