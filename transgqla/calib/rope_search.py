"""Greedy choice of what fills DeepSeek's RoPE slots, judged by the layer's own attention output.

FreqFold keeps the components with the most key energy. What matters is how much the attention
output after ``o_proj`` changes, so here each slot ``p`` (rotating at source frequency
``f = p * collapse``) is filled in turn with the candidate component that minimizes that error on
calibration sequences (:class:`~.output_probe.OutputProbe`), given the slots already filled and with
every dropped pair's rotation replaced by its attention-weighted phase ``lambda``. Candidates are
principal components (by key energy and by drop cost) of single frequencies and of FreqFold blocks
around ``f``, made orthogonal to the components already chosen.

Scores are updated incrementally. A component ``u`` (real weights over the complex pairs ``(g, i)``)
moves ``Re(conj(q''_u) k'_u)`` out of the nope score and adds ``Re(conj(q'_u) k'_u e^{j (s - t) w_f})``
as a rotating term; both are products of one complex number per query row and one per key position,
so a candidate's score change is a rank-4 real product ``left[S n_g, m T, 4] @ right[S n_g, 4, L]``.
The candidates of a slot are scored together, as one batch of a few large products.
The small per-component algebra (candidates, projections of ``q``, ``k``) stays float64; the scores
and their softmax are float32 (output_probe.py says why).
"""

from __future__ import annotations

import torch

from ..mathx.linalg import eigh_descending
from ..mathx.rorope import embed_component, pair_energy
from .output_probe import QUERY_STRIDE, OutputProbe


def _complex(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


class AttentionErrorModel:
    """Incremental attention-output error of one layer as RoPE slots are filled.

    ``q[S, n_h, L, d]``, ``k``/``v`` ``[S, n_g, L, d]`` (unrotated, biases included), ``wo[D, n_h d]``,
    ``freqs[d/2]``, ``phase[n_g, d/2]`` (complex): the stand-in factor of each dropped pair; ``scale``:
    the source's softmax scale. ``probe`` (optional) reuses an :class:`OutputProbe` of the same inputs.
    """

    def __init__(self, q, k, v, wo, freqs, phase, scale: float, window: int | None = None,
                 stride: int = QUERY_STRIDE, probe: OutputProbe | None = None):
        self.probe = probe or OutputProbe(q, k, v, wo, freqs, scale, window, stride)
        pr = self.probe
        self.n_g, self.m, self.scale = k.shape[1], q.shape[1] // k.shape[1], scale
        dev = q.device
        self.freqs = freqs.to(dev)
        s, n_h, length, d = q.shape
        q_rows = q[:, :, pr.rows].to(torch.float64)  # [S, n_h, T, d]: (re | im) halves, rotate_half layout
        k = k.to(torch.float64)
        self.phase_h = phase.to(dev).repeat_interleave(self.m, 0)  # [n_h, d/2]
        # Real layouts for the per-component products (complex einsums are slow on CPU):
        self.q_heads = q_rows.permute(1, 0, 2, 3).reshape(n_h, s * pr.t, d)  # [n_h, S T, d]
        self.k_flat = torch.cat((k[..., : d // 2], k[..., d // 2 :]), 1).permute(0, 2, 1, 3).reshape(s * length, -1)
        self.row_pos = pr.rows.to(torch.float64)
        self._rot: tuple[float, tuple[torch.Tensor, ...]] | None = None
        self.key_pos = torch.arange(length, device=dev, dtype=torch.float64)
        # Every pair dropped with its phase: Re(conj(q) lambda k) = Re(a) Re(k) + Im(a) Im(k), a = q conj(lambda).
        a = _complex(q_rows) * torch.conj(self.phase_h)[None, :, None, :]
        left = torch.cat((a.real, a.imag), -1)
        nope = pr.fold_queries(left) @ pr.fold_keys(k).transpose(1, 2)
        self.scores = (nope * scale).to(pr.dtype) + pr.mask_bias  # [S n_g, m T, L], scaled and masked

    def delta(self, us: list[torch.Tensor], slot_freq: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled score changes ``left @ right`` when each component ``u[n_g, d/2]`` of ``us`` moves from
        nope to a slot rotating at ``slot_freq``: ``left[C, S n_g, m T, 4]``, ``right[C, S n_g, 4, L]``."""
        pr = self.probe
        s, t, length, c = pr.s, pr.t, self.key_pos.shape[0], len(us)
        u = torch.stack(us).to(torch.float64)  # [C, n_g, d/2]
        # Row factors q_u = sum_i u_i q_i and q''_u = sum_i u_i conj(lambda_i) q_i, per head (u of its group),
        # as one real product: columns (Re q_u, Im q_u, Re q''_u, Im q''_u) per candidate.
        ug = u.repeat_interleave(self.m, 1)  # [C, n_h, d/2]
        w = ug * torch.conj(self.phase_h)
        zero = torch.zeros_like(ug)
        cols = torch.stack((torch.cat((ug, zero), 2), torch.cat((zero, ug), 2),
                            torch.cat((w.real, -w.imag), 2), torch.cat((w.imag, w.real), 2)), -1)  # [C, n_h, d, 4]
        cols = cols.permute(1, 2, 0, 3).reshape(cols.shape[1], cols.shape[2], 4 * c)
        rows = torch.bmm(self.q_heads, cols).reshape(-1, s, t, c, 4).permute(3, 1, 0, 2, 4)  # [C, S, n_h, T, 4]
        # Key factor k_u = sum_{g,i} u_{g,i} k_{g,i} (one for all groups): (Re, Im).
        k_u = (self.k_flat.view(s * length, 2, -1) @ u.reshape(c, -1).T).view(s, length, 2, c)
        cos_t, sin_t, cos_l, sin_l = self._rotation(slot_freq)
        qr, qi = rows[..., 0], rows[..., 1]
        kr, ki = k_u[:, :, 0].permute(2, 0, 1), k_u[:, :, 1].permute(2, 0, 1)  # [C, S, L]
        # Re(conj(a) b) - Re(conj(q''_u) k_u) with a = q_u e^{j t f}, b = k_u e^{j s f}.
        left = torch.stack((qr * cos_t - qi * sin_t, qr * sin_t + qi * cos_t, -rows[..., 2], -rows[..., 3]), -1)
        right = torch.stack((kr * cos_l - ki * sin_l, kr * sin_l + ki * cos_l, kr, ki), 2)  # [C, S, 4, L]
        right = right[:, :, None].expand(-1, -1, self.n_g, -1, -1)
        left = (left * self.scale).reshape(c, s * self.n_g, self.m * t, 4)
        return left.to(pr.dtype), right.reshape(c, s * self.n_g, 4, length).to(pr.dtype)

    def _rotation(self, freq: float) -> tuple[torch.Tensor, ...]:
        """``cos, sin`` of ``freq`` times the query rows' and the keys' positions (kept for the slot's commit)."""
        if self._rot is None or self._rot[0] != freq:
            t, s = self.row_pos * freq, self.key_pos * freq
            self._rot = (freq, (t.cos(), t.sin(), s.cos(), s.sin()))
        return self._rot[1]

    def candidate_errors(self, us: list[torch.Tensor], slot_freq: float) -> list[float]:
        left, right = self.delta(us, slot_freq)
        return self.probe.errors(torch.matmul(left, right).add_(self.scores))

    def commit(self, u: torch.Tensor, slot_freq: float) -> None:
        left, right = self.delta([u], slot_freq)
        self.scores.baddbmm_(left[0], right[0])

    def current_error(self) -> float:
        return self.probe.errors(self.scores[None].clone())[0]


def _candidates(key_gram, cost_weight, n_g, d, f, collapse, chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """Unit components ``[n_g, d/2]`` near frequency ``f``, orthogonal to ``chosen``."""
    half = d // 2
    blocks = {tuple([i]) for i in range(f, min(half, f + collapse))}
    for ff in (collapse, 2 * collapse):
        if ff > 1 and half % ff == 0:
            start = (f // ff) * ff
            blocks.add(tuple(range(start, start + ff)))
    out = []
    for freqs in sorted(blocks):
        energy = pair_energy(key_gram, n_g, d, list(freqs))
        span = slice(freqs[0], freqs[-1] + 1)  # every block is a run of adjacent frequencies
        for weight in (None, cost_weight[:, span].reshape(-1).sqrt())[: 1 if len(freqs) == 1 else 2]:
            e = energy if weight is None else weight[:, None] * energy * weight[None, :]
            _, vecs = eigh_descending(e)
            u = torch.zeros(n_g, half, dtype=torch.float64, device=key_gram.device)
            u[:, span] = vecs[:, 0].reshape(n_g, len(freqs))
            for w in chosen:
                u = u - (u * w).sum() * w
            norm = float(u.norm())
            if norm > 0.3:
                out.append(u / norm)
    return out or _orthogonal_fallback(key_gram, n_g, d, f, chosen)


def _orthogonal_fallback(key_gram, n_g, d, f, chosen: list[torch.Tensor]) -> list[torch.Tensor]:
    """The most energetic unit component in the span of frequency ``f``'s pairs and the chosen components,
    orthogonal to the chosen ones: the one candidate left when every principal component near ``f`` lies
    (mostly) in the span of components already chosen. Happens at ``d_R = head_dim`` (one slot per
    frequency): a two-frequency block chosen for slot ``f - 1`` can take most of frequency ``f``."""
    half = d // 2
    dev = key_gram.device
    vecs: list[torch.Tensor] = []
    for g in range(n_g):
        u = torch.zeros(n_g, half, dtype=torch.float64, device=dev)
        u[g, f] = 1.0
        for _ in range(2):  # twice: Gram-Schmidt against nearly parallel vectors
            for w in chosen + vecs:
                u = u - (u * w).sum() * w
        norm = float(u.norm())
        if norm > 1e-6:
            vecs.append(u / norm)
    if not vecs:
        return []
    basis = torch.stack(vecs).reshape(len(vecs), -1)  # [k, n_g d/2], pairs g major
    energy = pair_energy(key_gram, n_g, d, list(range(half)))
    _, top = eigh_descending(basis @ energy @ basis.T, top=1)
    u = (top[:, 0] @ basis).reshape(n_g, half)
    return [u / u.norm()]


def greedy_rope_basis(model: AttentionErrorModel, key_gram: torch.Tensor, cost_weight: torch.Tensor,
                      n_g: int, d: int, rope_dim: int) -> tuple[torch.Tensor, float]:
    """Fill the ``rope_dim/2`` slots greedily (highest frequency first); returns the key-space basis
    ``[n_g*d, d_R]`` (interleaved slot columns) and the final attention-output error. Ties go to the
    earlier candidate; the result depends only on the inputs and the torch thread count."""
    collapse = d // rope_dim
    chosen: list[torch.Tensor] = []
    columns = []
    err = model.current_error()
    for p in range(rope_dim // 2):
        freq = float(model.freqs[p * collapse])
        cands = _candidates(key_gram, cost_weight, n_g, d, p * collapse, collapse, chosen)
        errors = model.candidate_errors(cands, freq)
        best = min(range(len(cands)), key=lambda i: (errors[i], i))
        err, u = errors[best], cands[best]
        model.commit(u, freq)
        chosen.append(u)
        re, im = embed_component(u.reshape(-1), n_g, d, list(range(d // 2)))
        columns += [re, im]
    return torch.stack(columns, 1), err
