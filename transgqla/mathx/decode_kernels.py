"""Attention over a cache for GQLA's two decode paths, with the heads folded into query rows.

Why: ``torch.matmul`` broadcasting a cache ``[B, 1, T, r]`` against queries ``[B, n_h, s_q, r]``
materializes the cache once per head, so a decoder written that way reads ``n_h`` times the bytes the
path really needs and its timings say nothing about the path (DESIGN.md section 7). Here every cache
tensor is read by one batched matmul whose rows are all the queries that share it:

* absorb: one latent cache shared by all heads -> queries ``[B, n_h * s_q, r]`` against ``c[B, T, r]``;
* gqa: one K/V cache per group -> queries ``[B, n_g, m * s_q, d_k]`` against ``k[B, n_g, T, d_k]``
  (``m = n_h / n_g`` heads per group; head ``h`` belongs to group ``h // m``, the ``repeat_kv`` order).

Shapes: ``B`` batch, ``s_q`` query tokens of this step, ``T`` cached tokens (including this step's).
``mask[s_q, T]`` is boolean, True where a query may see a key. Softmax runs in at least float32;
float64 inputs stay float64 (the reference checks use it).
"""

from __future__ import annotations

import torch


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Softmax over the last dim of ``scores[..., s_q, T]`` where ``mask[s_q, T]`` allows; with
    ``softcap`` the scores become ``softcap * tanh(scores / softcap)`` first (Gemma2)."""
    wide = torch.promote_types(scores.dtype, torch.float32)
    scores = scores.to(wide)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def absorb_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    k_rope: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """MQA-style attention on the latent cache; returns ``o_lat[B, n_h, s_q, r]``.

    ``q_lat[B, n_h, s_q, r]`` (queries already absorbed through ``W_UK``), ``q_rope[B, n_h, s_q, d_R]``
    (rotated), ``latent[B, T, r]``, ``k_rope[B, T, d_R]`` (rotated). Scores are
    ``(q_lat . c + q_rope . k_R) * scale``; the output stays in latent space (apply ``W_UV`` after).
    """
    b, n_h, s_q, r = q_lat.shape
    rows_lat = q_lat.reshape(b, n_h * s_q, r)
    rows_rope = q_rope.reshape(b, n_h * s_q, q_rope.shape[-1])
    scores = torch.baddbmm(
        rows_rope @ k_rope.transpose(1, 2), rows_lat, latent.transpose(1, 2)
    )  # [B, n_h*s_q, T]
    probs = _masked_softmax(scores.view(b, n_h, s_q, -1) * scale, mask, softcap)
    out = probs.to(latent.dtype).view(b, n_h * s_q, -1) @ latent
    return out.view(b, n_h, s_q, r)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention on per-group caches; returns ``[B, n_h, s_q, d_v]``.

    ``q[B, n_h, s_q, d_k]``, ``k[B, n_g, T, d_k]``, ``v[B, n_g, T, d_v]``; the ``m`` heads of a group
    are stacked as ``m * s_q`` query rows against that group's cache (no per-head cache copies).
    """
    b, n_h, s_q, d_k = q.shape
    n_g = k.shape[1]
    m = n_h // n_g
    rows = q.reshape(b, n_g, m * s_q, d_k)
    scores = (rows @ k.transpose(2, 3)).view(b, n_g, m, s_q, -1)
    probs = _masked_softmax(scores * scale, mask, softcap)
    out = probs.to(v.dtype).view(b, n_g, m * s_q, -1) @ v
    return out.view(b, n_h, s_q, v.shape[-1])
