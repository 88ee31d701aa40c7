"""Greedy choice of what fills DeepSeek's RoPE slots, judged by the layer's own attention output.

FreqFold keeps the components with the most key energy. What matters is how much the attention
output after ``o_proj`` changes, so here each slot ``p`` (rotating at source frequency
``f = p * collapse``) is filled in turn with the candidate component that minimizes that error on
calibration sequences, given the slots already filled and with every dropped pair's rotation replaced
by its attention-weighted phase ``lambda``. Candidates are principal components (by key energy and by
drop cost) of single frequencies and of FreqFold blocks around ``f``, made orthogonal to the
components already chosen. Scores are updated incrementally: a component ``u`` (real weights over the
complex pairs ``(g, i)``) moves ``Re(conj(q''_u) k'_u)`` out of the nope score and adds
``Re(conj(q'_u) k'_u e^{j (s - t) w_f})`` as a rotating term.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from ..mathx.linalg import eigh_descending
from ..mathx.rope import cos_sin
from ..mathx.rorope import embed_component, pair_energy


CANDIDATE_THREADS = 2  # candidates scored at once; the result is the same for any count


def _complex(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


class AttentionErrorModel:
    """Incremental attention-output error of one layer as RoPE slots are filled."""

    def __init__(self, q, k, v, wo, freqs, phase, scale: float, window: int | None = None):
        # q [S, n_h, L, d], k/v [S, n_g, L, d] (unrotated, biases included), wo [D, n_h d], all float64
        self.n_h, self.n_g = q.shape[1], k.shape[1]
        self.m = self.n_h // self.n_g
        self.qc, self.kc = _complex(q), _complex(k)
        self.v, self.wo, self.freqs, self.phase, self.scale = v, wo, freqs, phase, scale
        length = q.shape[2]
        pos = torch.arange(length)
        mask = pos[None, :] <= pos[:, None]
        if window is not None:
            mask &= (pos[:, None] - pos[None, :]) < window
        self.mask = mask
        self.cos_t, self.sin_t = cos_sin(freqs, pos, dtype=torch.float64)  # [L, d/2]
        # Reference output with exact RoPE.
        exact = self._rot_scores(self.qc, self.kc.repeat_interleave(self.m, 1), freqs)
        self.reference = self._output(exact)
        lam = phase.repeat_interleave(self.m, 0)  # [n_h, d/2]
        kk = self.kc.repeat_interleave(self.m, 1)
        self.scores = torch.einsum("shti,shui->shtu", torch.conj(self.qc) * lam[None, :, None, :], kk).real
        self.ref_energy = float(self.reference.pow(2).sum())

    def _rot_scores(self, qc, kc, freqs_per_pair):
        """Exact rotated scores ``sum_i Re(conj(q_i) k_i e^{j (s-t) w_i})``, ``[S, n_h, L, L]``."""
        angles_t = torch.arange(qc.shape[2], dtype=torch.float64)[:, None] * freqs_per_pair[None, :]
        rot = torch.polar(torch.ones_like(angles_t), angles_t)  # [L, d/2]
        return torch.einsum("shti,shui->shtu", torch.conj(qc * rot), kc * rot).real

    def _output(self, scores: torch.Tensor) -> torch.Tensor:
        s = (scores * self.scale).masked_fill(~self.mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = p @ self.v.repeat_interleave(self.m, 1)  # [S, n_h, L, d]
        o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return o @ self.wo.T

    def delta(self, u: torch.Tensor, slot_freq: float) -> torch.Tensor:
        """Score change when component ``u[n_g, d/2]`` moves from nope to a slot rotating at ``slot_freq``."""
        ug = u.repeat_interleave(self.m, 0)  # [n_h, d/2]
        k_u = torch.einsum("gi,sgli->sl", u.to(torch.complex128), self.kc)  # [S, L]
        q_u = torch.einsum("hi,shli->shl", ug.to(torch.complex128), self.qc)
        q_uu = torch.einsum("hi,shli->shl", ug * torch.conj(self.phase.repeat_interleave(self.m, 0)), self.qc)
        pos = torch.arange(k_u.shape[-1], dtype=torch.float64)
        rot = torch.polar(torch.ones_like(pos), pos * slot_freq)
        rope = torch.einsum("sht,su->shtu", torch.conj(q_u * rot), k_u * rot).real
        nope = torch.einsum("sht,su->shtu", torch.conj(q_uu), k_u).real
        return rope - nope

    def error(self, scores: torch.Tensor) -> float:
        return float((self._output(scores) - self.reference).pow(2).sum()) / self.ref_energy


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
        for weight in (None, cost_weight[:, list(freqs)].reshape(-1).sqrt())[: 1 if len(freqs) == 1 else 2]:
            e = energy if weight is None else weight[:, None] * energy * weight[None, :]
            vals, vecs = eigh_descending(e)
            for c in (0,):
                u = torch.zeros(n_g, half, dtype=torch.float64)
                u[:, list(freqs)] = vecs[:, c].reshape(n_g, len(freqs))
                for w in chosen:
                    u = u - (u * w).sum() * w
                norm = float(u.norm())
                if norm > 0.3:
                    out.append(u / norm)
    return out


def greedy_rope_basis(model: AttentionErrorModel, key_gram: torch.Tensor, cost_weight: torch.Tensor,
                      n_g: int, d: int, rope_dim: int, threads: int | None = None) -> tuple[torch.Tensor, float]:
    """Fill the ``rope_dim/2`` slots greedily (highest frequency first); returns the key-space basis
    ``[n_g*d, d_R]`` (interleaved slot columns) and the final attention-output error.

    The candidates of a slot are scored on ``threads`` (default ``CANDIDATE_THREADS``) threads at once (this search is most of a
    calibrated conversion's time). Each score is computed exactly as on one thread, on the caller's
    torch thread count, and ties go to the earlier candidate, so the result does not depend on it."""
    collapse = d // rope_dim
    chosen: list[torch.Tensor] = []
    columns = []
    scores = model.scores
    err = model.error(scores)
    math_threads = torch.get_num_threads()
    threads = CANDIDATE_THREADS if threads is None else threads
    with ThreadPoolExecutor(max_workers=max(1, threads), initializer=torch.set_num_threads,
                            initargs=(math_threads,)) as pool:
        for p in range(rope_dim // 2):
            freq = float(model.freqs[p * collapse])
            cands = _candidates(key_gram, cost_weight, n_g, d, p * collapse, collapse, chosen)
            errors = list(pool.map(lambda u: model.error(scores + model.delta(u, freq)), cands))
            best = min(range(len(cands)), key=lambda i: (errors[i], i))
            err, u = errors[best], cands[best]
            scores = scores + model.delta(u, freq)
            chosen.append(u)
            re, im = embed_component(u.reshape(-1), n_g, d, list(range(d // 2)))
            columns += [re, im]
    return torch.stack(columns, 1), err
