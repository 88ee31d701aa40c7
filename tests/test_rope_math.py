"""RoPE geometry and RoRoPE, against dense computations written out here."""

import math

import torch

from transgqla.mathx.rope import (
    cos_sin,
    half_to_interleaved,
    interleaved_layout,
    interleaved_to_half,
    inv_freq,
    rotate_half_layout,
)
from transgqla.mathx.rorope import block_components, embed_component, rope_basis


def test_layouts_round_trip_and_commute_with_rotation():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.equal(interleaved_to_half(half_to_interleaved(x)), x)
    cos, sin = cos_sin(inv_freq(16, 10000.0), torch.arange(5), dtype=torch.float64)
    a = half_to_interleaved(rotate_half_layout(x, cos, sin))
    b = interleaved_layout(half_to_interleaved(x), cos, sin)
    assert torch.allclose(a, b, atol=1e-12)


def test_rotate_half_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = torch.randn(1, 2, 7, 16, dtype=torch.float64)
    cos, sin = cos_sin(inv_freq(16, 10000.0), torch.arange(7), dtype=torch.float64)
    hf_q, _ = apply_rotary_pos_emb(q, q, torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None])
    assert torch.allclose(rotate_half_layout(q, cos, sin), hf_q, atol=1e-12)


def test_llama3_frequencies_match_transformers_and_collapse():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=scaling)
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = inv_freq(128, 500000.0, scaling)
    assert torch.allclose(ours.float(), hf.float(), rtol=1e-6)
    # DeepSeek geometry at d_R = 64 reuses every second source frequency.
    assert torch.allclose(inv_freq(64, 500000.0, scaling), ours[::2], rtol=1e-12)


def _scores_with_rope(q, k, freqs, pos_q, pos_k):
    """Dense reference: rotate_half RoPE on q[T,d], k[S,d], then dot products."""
    cq, sq = cos_sin(freqs, pos_q, dtype=torch.float64)
    ck, sk = cos_sin(freqs, pos_k, dtype=torch.float64)
    return rotate_half_layout(q, cq, sq) @ rotate_half_layout(k, ck, sk).T


def test_rorope_with_every_component_rotated_is_exact():
    """Mix groups per frequency with the PCA rotation, rotate each component at its own frequency:
    every head's scores are unchanged."""
    n_g, d, m, D = 3, 8, 2, 20
    torch.manual_seed(0)
    wk = torch.randn(n_g * d, D, dtype=torch.float64)
    wq = torch.randn(n_g * m, d, D, dtype=torch.float64)
    x = torch.randn(6, D, dtype=torch.float64)
    freqs = inv_freq(d, 100.0)
    pos = torch.arange(6)
    gram = wk @ wk.T
    cols, col_freq = [], []
    for i in range(d // 2):
        _, vecs = block_components(gram, n_g, d, [i])
        for c in range(n_g):
            re, im = embed_component(vecs[:, c], n_g, d, [i])
            cols += [re, im]
            col_freq.append(freqs[i])
    basis = torch.stack(cols, 1)  # [n_g d, n_g d], orthonormal
    assert torch.allclose(basis.T @ basis, torch.eye(n_g * d, dtype=torch.float64), atol=1e-10)
    keys = x @ wk.T  # [S, n_g d]
    k_rot = keys @ basis  # components, interleaved
    comp_freqs = torch.stack(col_freq)
    for h in range(n_g * m):
        g = h // m
        q = x @ wq[h].T
        ref = _scores_with_rope(q, keys[:, g * d : (g + 1) * d], freqs, pos, pos)
        q_comp = q @ basis[g * d : (g + 1) * d]  # head h's share of every component
        cq, sq = cos_sin(comp_freqs, pos, dtype=torch.float64)
        got = interleaved_layout(q_comp, cq, sq) @ interleaved_layout(k_rot, cq, sq).T
        assert torch.allclose(got, ref, atol=1e-9)


def test_rope_basis_is_orthonormal_and_keeps_top_energy():
    n_g, d = 2, 16
    torch.manual_seed(1)
    a = torch.randn(n_g * d, 40, dtype=torch.float64)
    gram = a @ a.T
    for ff in (1, 2, 4, 8):
        rb = rope_basis(gram, n_g, d, 8, ff)
        assert torch.allclose(rb.basis.T @ rb.basis, torch.eye(8, dtype=torch.float64), atol=1e-10)
        assert 0 < rb.energy_kept < 1
    full = rope_basis(gram[:d, :d], 1, d, d, 1)  # one group, every dim kept: all energy
    assert math.isclose(full.energy_kept, 1.0, rel_tol=1e-12)
