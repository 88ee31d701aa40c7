"""The head-folded decode kernels against a per-head float64 loop written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch

from transgqla.mathx.decode_kernels import absorb_attention, gqa_attention

from helpers import LargestAllocation


def _mask(s_q: int, t: int) -> torch.Tensor:
    """The last ``s_q`` of ``t`` positions, causal."""
    q_pos = torch.arange(t - s_q, t)
    return torch.arange(t)[None, :] <= q_pos[:, None]


def _per_head(q_rows, keys, values, mask, scale):
    """One head, one query row at a time: softmax(q.k * scale) @ v, masked, in float64."""
    out = torch.empty(q_rows.shape[0], values.shape[-1], dtype=torch.float64)
    for i, q in enumerate(q_rows):
        s = (keys @ q) * scale
        s[~mask[i]] = -math.inf
        out[i] = torch.softmax(s, dim=0) @ values
    return out


@pytest.mark.parametrize("s_q", [1, 2, 3])
def test_absorb_kernel_matches_per_head_loop(s_q):
    g = torch.Generator().manual_seed(0)
    b, n_h, t, r, d_r = 2, 6, 9, 10, 4
    q_lat, q_rope = torch.randn(b, n_h, s_q, r, generator=g), torch.randn(b, n_h, s_q, d_r, generator=g)
    c, k_r = torch.randn(b, t, r, generator=g), torch.randn(b, t, d_r, generator=g)
    mask, scale = _mask(s_q, t), 0.3
    got = absorb_attention(q_lat, q_rope, c, k_r, mask, scale)
    assert got.shape == (b, n_h, s_q, r) and got.dtype == torch.float32
    for bi in range(b):
        keys = torch.cat((c[bi], k_r[bi]), dim=-1).double()
        for h in range(n_h):
            rows = torch.cat((q_lat[bi, h], q_rope[bi, h]), dim=-1).double()
            want = _per_head(rows, keys, c[bi].double(), mask, scale)
            torch.testing.assert_close(got[bi, h].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_q", [1, 2])
def test_gqa_kernel_matches_per_head_loop_with_repeat_kv_grouping(s_q):
    g = torch.Generator().manual_seed(1)
    b, n_h, n_g, t, d_k, d_v = 2, 6, 3, 7, 5, 4
    q = torch.randn(b, n_h, s_q, d_k, generator=g, dtype=torch.float64)
    k = torch.randn(b, n_g, t, d_k, generator=g, dtype=torch.float64)
    v = torch.randn(b, n_g, t, d_v, generator=g, dtype=torch.float64)
    mask, scale = _mask(s_q, t), 0.7
    got = gqa_attention(q, k, v, mask, scale)
    assert got.dtype == torch.float64
    m = n_h // n_g
    for bi in range(b):
        for h in range(n_h):
            want = _per_head(q[bi, h], k[bi, h // m], v[bi, h // m], mask, scale)
            torch.testing.assert_close(got[bi, h], want, rtol=1e-12, atol=1e-12)


def test_kernels_do_not_copy_the_cache_per_head():
    """A per-head copy of the cache (what broadcasting ``[B, 1, T, r]`` against ``[B, n_h, ...]``
    does) is ``B * n_h * T * r`` elements; the folded kernels never allocate anything near it."""
    b, n_h, n_g, s_q, t, r, d_r = 2, 32, 4, 2, 128, 256, 32
    q_lat, q_rope = torch.randn(b, n_h, s_q, r), torch.randn(b, n_h, s_q, d_r)
    c, k_r = torch.randn(b, t, r), torch.randn(b, t, d_r)
    k, v = torch.randn(b, n_g, t, r), torch.randn(b, n_g, t, r)
    mask, per_head_copy = _mask(s_q, t), b * n_h * t * r

    with LargestAllocation() as naive:  # the detector sees the copy in the broadcasting form
        torch.softmax(q_lat @ c.transpose(1, 2)[:, None], dim=-1) @ c[:, None]
    assert naive.largest >= per_head_copy

    with LargestAllocation() as folded:
        absorb_attention(q_lat, q_rope, c, k_r, mask, 0.1)
        gqa_attention(q_lat, k, v, mask, 0.1)
    assert folded.largest < per_head_copy // 4, folded.largest
