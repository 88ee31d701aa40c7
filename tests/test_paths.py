"""The absorb and GQA decoding paths are one set of weights: they agree to float rounding in prefill,
in cached token-by-token decode, and in two-token (MTP-style) decode."""

import pytest
import torch

from helpers import LargestAllocation, load_decoder, rel_err, run_convert

TOL = 1e-5


@pytest.fixture(params=["llama", "qwen2"])
def lossy(request, source_factory, tmp_path):
    src, _ = source_factory(request.param, n_kv=2, n_heads=6, head_dim=16, hidden=96)
    out = tmp_path / "out"
    run_convert(src, out, qk_rope_dim=8, freqfold="4", kv_lora_rank=24)
    return load_decoder(out, dtype=torch.float32)


IDS = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(3))


def test_prefill_paths_agree(lossy):
    a = lossy.forward(IDS, lossy.new_cache("absorb"))
    g = lossy.forward(IDS, lossy.new_cache("gqa"))
    assert rel_err(a, g) < TOL


@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_cached_decode_matches_prefill(lossy, path, step):
    full = lossy.forward(IDS, lossy.new_cache("gqa" if path == "absorb" else "absorb"))  # the other path's prefill
    cache = lossy.new_cache(path)
    pieces = [lossy.forward(IDS[:, :3], cache)]
    for start in range(3, IDS.shape[1], step):
        pieces.append(lossy.forward(IDS[:, start : start + step], cache))
    assert cache.length() == IDS.shape[1]
    assert rel_err(torch.cat(pieces, dim=1), full) < TOL


def test_greedy_tokens_identical(lossy):
    a = lossy.generate(IDS[:1, :4], 12, "absorb")
    g = lossy.generate(IDS[:1, :4], 12, "gqa")
    assert torch.equal(a, g)


def test_cache_sizes_follow_the_formula(lossy):
    geo = lossy.geo
    caches = {p: lossy.new_cache(p) for p in ("absorb", "gqa")}
    for p, c in caches.items():
        lossy.forward(IDS, c)
    assert caches["absorb"].values_per_token() == geo.rank + geo.d_rope == geo.cache_values_per_token("absorb")
    assert caches["gqa"].values_per_token() == geo.n_groups * (geo.d_nope + geo.d_rope + geo.d_v)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_source_decoder_matches_transformers(source_factory, family):
    """The plain source reference (used for fidelity and perplexity) equals stock transformers."""
    import json

    from transgqla.model.decoder import SourceDecoder

    from helpers import load_tensors

    src, model = source_factory(family, n_kv=2)
    dec = SourceDecoder(json.loads((src / "config.json").read_text()), load_tensors(src), dtype=torch.float64)
    with torch.no_grad():
        ref = model(IDS).logits
    assert rel_err(dec.forward(IDS, dec.new_cache()), ref) < 1e-5
    cache = dec.new_cache()
    steps = [dec.forward(IDS[:, :4], cache)] + [dec.forward(IDS[:, i : i + 1], cache) for i in range(4, IDS.shape[1])]
    assert rel_err(torch.cat(steps, 1), ref) < 1e-5


@pytest.mark.parametrize("path", ["absorb", "gqa"])
def test_reference_decode_step_makes_no_per_head_cache_copy(path):
    """A cached decode step of the reference attention reads the cache without copying it per head
    (what broadcasting ``[B, 1, T, r]`` or ``repeat_interleave`` of the GQA cache does)."""
    from transgqla.mathx.rope import inv_freq
    from transgqla.model.attention import KVCache, attention
    from transgqla.model.geometry import GQLAGeometry

    b, n_h, n_g, d_nope, d_r, d_v, r, hidden, t = 1, 32, 2, 16, 8, 16, 64, 64, 256
    geo = GQLAGeometry(hidden, n_h, n_g, d_nope, d_r, d_v, r, 1, 1e-6, inv_freq(d_r, 10000.0), None, "silu", False)
    g = torch.Generator().manual_seed(0)
    p = {
        "q_proj.weight": torch.randn(n_h * (d_nope + d_r), hidden, generator=g) * 0.1,
        "kv_a_proj_with_mqa.weight": torch.randn(r + d_r, hidden, generator=g) * 0.1,
        "kv_b_proj.weight": torch.randn(n_g * (d_nope + d_v), r, generator=g) * 0.1,
        "o_proj.weight": torch.randn(hidden, n_h * d_v, generator=g) * 0.1,
    }
    x = torch.randn(b, t + 1, hidden, generator=g)
    cache = KVCache(path)
    attention(x[:, :t], p, geo, torch.arange(t), cache, 0, path)
    with LargestAllocation() as seen:
        attention(x[:, t:], p, geo, torch.arange(t, t + 1), cache, 0, path)
    per_head = b * n_h * (t + 1) * (r if path == "absorb" else d_nope + d_r)
    assert seen.largest < per_head // 4, (seen.largest, per_head)
