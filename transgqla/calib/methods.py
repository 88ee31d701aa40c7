"""Per-layer conversion methods and the cheap searches behind ``auto``.

* ``pca``: data-free (statistics from the weights) FreqFold PCA + K/V-balanced joint PCA.
* ``transmla``: TransMLA's recipe on calibration statistics: FreqFold PCA of the calibration keys,
  BKV balance, PCA of the joint nope-key/value outputs.
* ``gqla`` (ours): the objective is the attention's own error. RoPE components are chosen by what
  dropping their rotation costs over the positions attention looks at, dropped pairs get the
  attention-weighted phase that best replaces their rotation, and the latent is factorized in the
  metric of the queries (keys) and of ``W_O`` (values). The key/value balance is chosen per layer by
  the layer's attention-output error on calibration sequences.

Every candidate is judged by one :class:`~.output_probe.OutputProbe` per layer, built from the source
attention on the sample sequences. Candidates share everything that does not depend on them: the
RoPE part of the scores depends only on the RoPE basis, the latent Gram only on the metric
(mathx/metric_latent.py), so a balance costs an eigensolve and products with ``r`` columns, and the
output tensors are assembled once, for the winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..mathx.attention_stats import group_output_metric, group_query_metric, rotation_stats, source_attention_parts
from ..mathx.gqla_layer import (
    ConvertedAttention,
    KeySplit,
    LayerObjective,
    LayerSettings,
    SourceAttention,
    assemble,
    factorize_latent,
    split_keys,
)
from ..mathx.lowrank import Factorization
from ..mathx.metric_latent import MetricLatent
from ..mathx.moments import augment
from ..mathx.rope import cos_sin, interleaved_layout
from ..mathx.rorope import check_geometry, pair_energy
from .output_probe import OutputProbe
from .rope_search import AttentionErrorModel, greedy_rope_basis
from .runner import LayerCalibration

CALIBRATED_METHODS = ("transmla", "gqla")
BALANCE_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class LayerContext:
    """What a calibrated layer conversion needs besides the projections."""

    wo: torch.Tensor  # [D, n_h d]
    freqs: torch.Tensor  # source RoPE frequencies [d/2]
    window: int | None
    gqla_config: dict  # a config GQLAGeometry can read (source keys + GQLA dims)
    device: torch.device = torch.device("cpu")  # where this math runs; every tensor above is on it


@dataclass
class SampleAttention:
    """The source attention on the sample sequences ``x[S, L, D]``: unrotated ``q[S, n_h, L, d]``,
    ``k``/``v`` ``[S, n_g, L, d]`` (float64, biases included), ``probs[S, n_h, L, L]`` and the probe."""

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor
    probe: OutputProbe
    scale: float  # the source's softmax scale


def source_scale(src: SourceAttention) -> float:
    return src.softmax_scale if src.softmax_scale is not None else 1 / math.sqrt(src.head_dim)


def sample_attention(src: SourceAttention, calib: LayerCalibration, ctx: LayerContext) -> SampleAttention:
    n_g, d = src.n_groups, src.head_dim
    x = calib.samples.double()
    q, k, probs = source_attention_parts(x, src.wq.double(), src.bq, src.wk.double(), src.bk,
                                         src.n_heads, n_g, d, ctx.freqs, ctx.window, src.softmax_scale)
    v = torch.nn.functional.linear(x, src.wv.double(), src.bv).view(x.shape[0], x.shape[1], n_g, d).transpose(1, 2)
    scale = source_scale(src)
    probe = OutputProbe(q, k, v, ctx.wo, ctx.freqs, scale, ctx.window)
    return SampleAttention(x, q, k, v, probs, probe, scale)


def freqfold_candidates(head_dim: int, rope_dim: int) -> list[int]:
    collapse = head_dim // rope_dim
    out = []
    for ff in (max(1, collapse // 2), collapse, 2 * collapse, 4 * collapse):
        try:
            check_geometry(head_dim, rope_dim, ff)
        except ValueError:
            continue
        if ff not in out:
            out.append(ff)
    return out


class LatentScorer:
    """Attention-output error of converted candidates that share one RoPE basis (``split.basis``).

    The RoPE part of the scores, ``Re(conj(q_R) k_R e^{j (s - t) w_p})`` at DeepSeek's slot frequencies,
    is made once; a candidate latent adds its nope scores ``q . (W_UK c)`` and brings its values."""

    def __init__(self, sa: SampleAttention, split: KeySplit, freqs: torch.Tensor):
        pr = sa.probe
        s, n_h, length, d = sa.q.shape
        n_g = sa.k.shape[1]
        d_r = split.basis.shape[1]
        self.sa, self.split, self.n_g, self.d = sa, split, n_g, d
        basis = split.basis.double().reshape(n_g, d, d_r)
        q_rows = sa.q[:, :, pr.rows]  # [S, n_h, T, d]
        q_r = torch.einsum("shtd,hdr->shtr", q_rows, basis.repeat_interleave(n_h // n_g, 0))
        k_r = torch.einsum("sgld,gdr->slr", sa.k, basis)  # [S, L, d_R]: one RoPE key for all groups
        slot = freqs.to(sa.q.device)[:: d // d_r]  # pair p rotates at source frequency p * collapse
        cos, sin = cos_sin(slot, torch.arange(length, device=sa.q.device), dtype=torch.float64)
        q_r = interleaved_layout(q_r, cos[pr.rows], sin[pr.rows])
        k_r = interleaved_layout(k_r, cos, sin)
        rope = q_r.reshape(s, n_g, -1, d_r) @ k_r[:, None].transpose(-1, -2)  # [S, n_g, m T, L]
        self.base = (rope.reshape(s * n_g, -1, length) * sa.scale).to(pr.dtype) + pr.mask_bias
        self.q_nope = pr.fold_queries(q_rows * sa.scale).to(pr.dtype)  # [S n_g, m T, d]
        self.x_aug = augment(sa.x.reshape(-1, sa.x.shape[-1]), None, pr.dtype)
        self.x_aug[:, -1] = 1.0
        self.value_bias = split.value_bias.to(pr.dtype)
        self._buffer = pr.empty_logits()

    def error(self, fac: Factorization) -> float:
        pr, n_g, d = self.sa.probe, self.n_g, self.d
        s, length = self.sa.x.shape[:2]
        c = self.x_aug @ fac.down.T.to(pr.dtype)  # [S L, r]
        kv = (c @ fac.up.T.to(pr.dtype)).view(s, length, 2, n_g, d)  # nope keys, then values
        k_nope = pr.fold_keys(kv[:, :, 0].transpose(1, 2))
        v = pr.fold_keys((kv[:, :, 1] + self.value_bias.view(n_g, d)).transpose(1, 2))
        logits = torch.baddbmm(self.base, self.q_nope, k_nope.transpose(1, 2), out=self._buffer)
        return pr.error(logits, v)


def gqla_objective(src: SourceAttention, calib: LayerCalibration, ctx: LayerContext, rope_dim: int,
                   sa: SampleAttention, greedy_rope: bool = True) -> LayerObjective:
    """The attention-aware statistics of :class:`LayerObjective` for this layer."""
    n_g, d = src.n_groups, src.head_dim
    phase, cost = rotation_stats(sa.q, sa.k, sa.probs, ctx.freqs)
    wk = augment(src.wk, src.bk)
    gram = calib.moment.gram(wk)
    energy = torch.diagonal(pair_energy(gram, n_g, d, list(range(d // 2)))).reshape(n_g, d // 2)
    rope_weight = cost / energy.clamp_min(1e-30 * float(energy.max()))
    rope_weight = rope_weight / rope_weight.mean().clamp_min(1e-300)
    wq = augment(src.wq, src.bq).reshape(src.n_heads, d, -1)
    basis = None
    if greedy_rope:
        model = AttentionErrorModel(sa.q, sa.k, sa.v, ctx.wo, ctx.freqs, phase, sa.scale, ctx.window, probe=sa.probe)
        basis, _ = greedy_rope_basis(model, gram, rope_weight, n_g, d, rope_dim)
    return LayerObjective(
        rope_basis=basis,
        rope_weight=rope_weight,
        nope_phase=phase,
        key_metric=group_query_metric(wq, calib.moment, n_g),
        value_metric=group_output_metric(ctx.wo, n_g, d),
    )


def grid_descent(grid: tuple[float, ...], start: float, score) -> tuple[float, object]:
    """A local minimum of ``score`` (returning ``(error, payload)``) over the sorted ``grid``: evaluate
    ``start`` and both neighbours, then walk toward the better one while the error falls (ties: the
    lower side). Three to five evaluations where a full scan of seven costs seven."""
    results: dict[int, tuple[float, object]] = {}

    def err(i: int) -> float:
        if i not in results:
            results[i] = score(grid[i])
        return results[i][0]

    i = grid.index(start)
    lower = i - 1 >= 0 and err(i - 1) < err(i)
    upper = i + 1 < len(grid) and err(i + 1) < err(i)
    if lower or upper:
        step = -1 if lower and (not upper or err(i - 1) <= err(i + 1)) else 1
        i += step
        while 0 <= i + step < len(grid) and err(i + step) < err(i):
            i += step
    return grid[i], results[i]


def convert_layer(src: SourceAttention, calib: LayerCalibration, settings: LayerSettings, method: str,
                  ctx: LayerContext, search_freqfold: bool) -> ConvertedAttention:
    """Convert one layer with a calibrated ``method``, keeping the candidate (FreqFold for ``transmla``,
    the key/value balance for ``gqla``) whose attention output on the sample sequences is closest to
    the source's."""
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"unknown calibrated method {method!r}")
    sa = sample_attention(src, calib, ctx)
    if method == "transmla":
        ffs = freqfold_candidates(src.head_dim, settings.qk_rope_head_dim) if search_freqfold else [settings.freqfold]
        best = None
        for ff in ffs:
            s = replace(settings, freqfold=ff)
            split = split_keys(src, calib.moment, s)
            fac, e_k, e_v = factorize_latent(split, calib.moment, s)
            err = LatentScorer(sa, split, ctx.freqs).error(fac)
            if best is None or err < best[0]:
                best = (err, s, split, fac, e_k, e_v)
        err, s, split, fac, e_k, e_v = best
        conv = assemble(src, split, fac, s, e_k, e_v)
        conv.report.update(attn_output_rel_error=err, freqfold=s.freqfold)
        return conv
    # gqla: the greedy RoPE choice replaces FreqFold; keys and values are reconstructed where attention
    # reads them (attention-weighted moment).
    obj = gqla_objective(src, calib, ctx, settings.qk_rope_head_dim, sa)
    moment = calib.attention_moment if calib.attention_moment is not None else calib.moment
    split = split_keys(src, moment, settings, obj)
    latent = MetricLatent(split.joint, moment, obj.key_metric, obj.value_metric)
    scorer = LatentScorer(sa, split, ctx.freqs)

    def score(balance: float):
        fac = latent.factorize(settings.kv_lora_rank, balance)
        return scorer.error(fac), fac

    balance, (err, fac) = grid_descent(BALANCE_GRID, 1.0, score)
    conv = assemble(src, split, fac, settings, latent.key_energy, latent.value_energy)
    conv.report.update(attn_output_rel_error=err, freqfold=settings.freqfold, kv_balance=balance)
    return conv
