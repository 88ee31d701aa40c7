"""Attention-aware statistics of one source layer, from its inputs on calibration sequences.

They turn "how much key energy" into "how much the attention output changes":
* ``group_query_metric``: ``sum_{h in g} E[q_h q_h^T]``, the metric a group's nope-key error is seen through;
* ``group_output_metric``: ``sum_{h in g} W_O,h^T W_O,h``, the metric a group's value error is seen through;
* ``rotation_stats``: per group and frequency, the attention-weighted mean phase ``lambda`` of
  ``exp(j (s - t) w_i)`` and the score-error energy of dropping that pair's rotation. Low
  frequencies barely turn over the span attention actually looks at, so they are cheap to drop.
"""

from __future__ import annotations

import torch

from .moments import InputMoment
from .rope import cos_sin, rotate_half_layout


def group_query_metric(wq_aug: torch.Tensor, moment: InputMoment, n_groups: int) -> torch.Tensor:
    """``wq_aug[n_h, d, D+1]`` -> ``[n_g, d, d]`` (float64). The products run in float32 (one
    ``[n_h d, D+1] x [D+1, D+1]`` product, the largest of a calibrated layer's method math): the metric
    only weights the factorization, where float32's 1e-7 relative rounding is invisible."""
    n_h, d, _ = wq_aug.shape
    w = wq_aug.to(torch.float32)
    right = moment.right(w.reshape(n_h * d, -1)).reshape(n_h, d, -1)  # [n_h, d, D+1]
    per_head = torch.bmm(right, w.transpose(1, 2)).double()
    return per_head.reshape(n_groups, n_h // n_groups, d, d).sum(1)


def group_output_metric(wo: torch.Tensor, n_groups: int, head_dim: int) -> torch.Tensor:
    """``wo[D, n_h*d]`` -> ``[n_g, d, d]``."""
    w = wo.to(torch.float64).reshape(wo.shape[0], -1, head_dim)  # [D, n_h, d]
    per_head = torch.einsum("dhi,dhj->hij", w, w)
    return per_head.reshape(n_groups, -1, head_dim, head_dim).sum(1)


def source_attention_parts(x, wq, bq, wk, bk, n_heads, n_groups, head_dim, freqs, window=None, scale=None,
                           softcap=None):
    """Unrotated ``q[B,n_h,L,d]``, ``k[B,n_g,L,d]`` and source attention probabilities ``[B,n_h,L,L]``
    (softmax scale ``scale``, default ``head_dim ** -0.5``; scores soft-capped by ``softcap`` if given)."""
    b, length, _ = x.shape
    q = torch.nn.functional.linear(x, wq, bq).view(b, length, n_heads, head_dim).transpose(1, 2)
    k = torch.nn.functional.linear(x, wk, bk).view(b, length, n_groups, head_dim).transpose(1, 2)
    pos = torch.arange(length, device=x.device)
    cos, sin = cos_sin(freqs, pos, dtype=x.dtype)
    m = n_heads // n_groups
    scores = rotate_half_layout(q, cos, sin) @ rotate_half_layout(k, cos, sin).repeat_interleave(m, 1).transpose(2, 3)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= (pos[:, None] - pos[None, :]) < window
    scores = scores * (scale if scale is not None else head_dim**-0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return q, k, probs


def rotation_stats(q, k, probs, freqs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phase[n_g, d/2] complex, cost[n_g, d/2])`` from unrotated ``q``, ``k`` and ``probs``.

    With weights ``w = p_h(t,s) |q_{h,i}(t)|^2 |k_{g,i}(s)|^2`` summed over the group's heads, the
    least-squares constant for ``exp(j (s-t) w_i)`` is ``lambda = sum w e / sum w`` and the remaining
    error energy is ``sum w (1 - |lambda|^2)``.
    """
    b, n_h, length, d = q.shape
    n_g, half = k.shape[1], d // 2
    m = n_h // n_g
    a = (q[..., :half] ** 2 + q[..., half:] ** 2).double()  # [B, n_h, L, d/2]
    kk = (k[..., :half] ** 2 + k[..., half:] ** 2).double().repeat_interleave(m, 1)
    cos, sin = cos_sin(freqs, torch.arange(length, device=q.device), dtype=torch.float64)  # [L, d/2]
    p = probs.double()
    x_c = p @ (kk * cos)  # sum_s p(t,s) B(s) cos(s w)
    x_s = p @ (kk * sin)
    den = (a * (p @ kk)).sum(dim=(0, 2))  # [n_h, d/2]
    re = (a * (cos * x_c + sin * x_s)).sum(dim=(0, 2))
    im = (a * (cos * x_s - sin * x_c)).sum(dim=(0, 2))
    den, re, im = (t.reshape(n_g, m, half).sum(1) for t in (den, re, im))
    phase = torch.complex(re, im) / den.clamp_min(1e-300)
    cost = den * (1 - phase.abs() ** 2).clamp_min(0)
    return phase, cost
