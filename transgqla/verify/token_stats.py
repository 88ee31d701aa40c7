"""Next-token statistics of two models (KL, top-1 agreement, both perplexities) computed one slice of
the vocabulary at a time.

Why: the logits of a window are ``[T, V]`` (512 x 128256 float32 = 263 MB at Llama-3) and each
model's head is ``[V, D]`` (2.1 GB in float32). Here the two heads are read in matching chunks
``W[c, D]`` and every statistic is reduced online (a running log-sum-exp, as flash attention does),
so neither the full logits nor a full head is ever held. Accumulation is in float64.

For rows ``n`` with logits ``z_s`` (source) and ``z_g`` (GQLA), ``lse = log sum_v exp z``:

* ``KL(s || g) = sum_v p_s (z_s - z_g) - lse_s + lse_g``, the first term accumulated as
  ``sum_v exp(z_s - m_s) (z_s - z_g)`` with the same rescaling as ``sum_v exp(z_s - m_s)``;
* top-1 agreement: running ``argmax`` of each model (the first index on ties, like ``argmax``);
* negative log-likelihood of the target ``y``: ``lse - z[y]`` (rows without a target: ``y = -1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STATS_BYTES = 32 << 20  # float64 bytes of one [rows, vocabulary chunk] logit block


@dataclass
class TokenStats:
    """Sums over the rows seen so far (divide by ``positions`` / ``scored`` for the means)."""

    kl: float = 0.0
    agree: float = 0.0
    nll_source: float = 0.0
    nll_gqla: float = 0.0
    positions: int = 0
    scored: int = 0


class _Running:
    """Per-row running max, sum of exp, argmax and target logit of one model's logits."""

    def __init__(self, n: int, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.m = torch.full((n,), -torch.inf, **f64)
        self.s = torch.zeros(n, **f64)
        self.best = torch.full((n,), -torch.inf, **f64)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)
        self.target = torch.zeros(n, **f64)
        self.rescale = torch.zeros(n, **f64)  # exp(old m - new m) of the last update

    def update(self, z: torch.Tensor, start: int, targets: torch.Tensor) -> torch.Tensor:
        """Fold in logits ``z[n, c]`` of vocabulary ids ``start..start+c``; returns ``exp(z - m)``."""
        top, idx = z.max(dim=1)
        better = top > self.best
        self.best = torch.where(better, top, self.best)
        self.arg = torch.where(better, idx + start, self.arg)
        m = torch.maximum(self.m, top)
        self.rescale = torch.exp(self.m - m)  # 0 on the first chunk (m was -inf)
        e = torch.exp(z - m[:, None])
        self.s = self.s * self.rescale + e.sum(dim=1)
        self.m = m
        inside = (targets >= start) & (targets < start + z.shape[1])
        rows = inside.nonzero().squeeze(1)
        self.target[rows] = z[rows, targets[rows] - start]
        return e

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


@torch.no_grad()
def token_stats(src, gq, x_src: torch.Tensor, x_gq: torch.Tensor, targets: torch.Tensor) -> TokenStats:
    """Statistics of rows ``x_src[n, D]`` / ``x_gq[n, D]`` (final-normed hidden states of the same
    tokens) against next-token ids ``targets[n]`` (-1: no target). ``src`` / ``gq`` provide
    ``head_chunks(rows)`` (:class:`~transgqla.model.layerwise.LayerwiseModel`)."""
    n = x_src.shape[0]
    dev = x_src.device
    targets = targets.to(dev)
    chunk = max(64, STATS_BYTES // (8 * max(n, 1)))
    rs, rg = _Running(n, dev), _Running(n, dev)
    # a family's final logit soft-cap (Gemma2) is elementwise: applied chunk by chunk
    cap_s, cap_g = (getattr(m, "cap_logits", lambda z: z) for m in (src, gq))
    weighted = torch.zeros(n, dtype=torch.float64, device=dev)  # sum_v exp(z_s - m_s) (z_s - z_g)
    for (start, ws), (start_g, wg) in zip(src.head_chunks(chunk), gq.head_chunks(chunk), strict=True):
        assert start == start_g
        zs = cap_s(torch.nn.functional.linear(x_src, ws)).double()
        zg = cap_g(torch.nn.functional.linear(x_gq, wg)).double()
        es = rs.update(zs, start, targets)
        rg.update(zg, start, targets)
        weighted = weighted * rs.rescale + (es * (zs - zg)).sum(dim=1)
        del zs, zg, es
    lse_s, lse_g = rs.lse(), rg.lse()
    kl = weighted / rs.s - lse_s + lse_g
    has = targets >= 0
    return TokenStats(
        kl=float(kl.sum()),
        agree=float((rs.arg == rg.arg).sum()),
        nll_source=float((lse_s - rs.target)[has].sum()),
        nll_gqla=float((lse_g - rg.target)[has].sum()),
        positions=n,
        scored=int(has.sum()),
    )
