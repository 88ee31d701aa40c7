"""Per-layer conversion methods and the cheap searches behind ``auto``.

* ``pca``: data-free (statistics from the weights) FreqFold PCA + K/V-balanced joint PCA.
* ``transmla``: TransMLA's recipe on calibration statistics: FreqFold PCA of the calibration keys,
  BKV balance, PCA of the joint nope-key/value outputs.
* ``gqla`` (ours): the objective is the attention's own error. RoPE components are chosen by what
  dropping their rotation costs over the positions attention looks at, dropped pairs get the
  attention-weighted phase that best replaces their rotation, and the latent is factorized in the
  metric of the queries (keys) and of ``W_O`` (values). FreqFold and the key/value balance are chosen
  per layer by the layer's attention-output error on calibration sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..mathx.attention_stats import group_output_metric, group_query_metric, rotation_stats, source_attention_parts
from ..mathx.gqla_layer import ConvertedAttention, LayerObjective, LayerSettings, SourceAttention, convert_attention
from ..mathx.moments import augment
from ..mathx.rorope import check_geometry, pair_energy
from ..model.attention import KVCache, attention
from ..model.geometry import GQLAGeometry
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


def attention_output_error(src: SourceAttention, conv: ConvertedAttention, ctx: LayerContext, x: torch.Tensor) -> float:
    """``||o_gqla - o_src||^2 / ||o_src||^2`` of the layer's attention output (after ``o_proj``) on ``x``."""
    x = x.double()
    _, _, probs = source_attention_parts(x, src.wq.double(), src.bq, src.wk.double(), src.bk,
                                         src.n_heads, src.n_groups, src.head_dim, ctx.freqs, ctx.window)
    v = torch.nn.functional.linear(x, src.wv.double(), src.bv).view(x.shape[0], x.shape[1], src.n_groups, -1).transpose(1, 2)
    m = src.n_heads // src.n_groups
    o = (probs @ v.repeat_interleave(m, 1)).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    ref = o @ ctx.wo.double().T
    geo = GQLAGeometry.from_config(ctx.gqla_config)
    params = {k: t.double() for k, t in conv.tensors.items()}
    params["o_proj.weight"] = ctx.wo.double()
    got = attention(x, params, geo, torch.arange(x.shape[1]), KVCache("absorb"), 0, "absorb")
    return float((got - ref).pow(2).sum() / ref.pow(2).sum())


def gqla_objective(src: SourceAttention, calib: LayerCalibration, ctx: LayerContext, rope_dim: int,
                   greedy_rope: bool = True) -> LayerObjective:
    """The attention-aware statistics of :class:`LayerObjective` for this layer."""
    n_g, d = src.n_groups, src.head_dim
    x = calib.samples.double()
    q, k, probs = source_attention_parts(x, src.wq.double(), src.bq, src.wk.double(), src.bk,
                                         src.n_heads, n_g, d, ctx.freqs, ctx.window)
    phase, cost = rotation_stats(q, k, probs, ctx.freqs)
    wk = augment(src.wk, src.bk)
    gram = calib.moment.gram(wk)
    energy = torch.diagonal(pair_energy(gram, n_g, d, list(range(d // 2)))).reshape(n_g, d // 2)
    rope_weight = cost / energy.clamp_min(1e-30 * float(energy.max()))
    rope_weight = rope_weight / rope_weight.mean().clamp_min(1e-300)
    wq = augment(src.wq, src.bq).reshape(src.n_heads, d, -1)
    basis = None
    if greedy_rope:
        v = torch.nn.functional.linear(x, src.wv.double(), src.bv).view(x.shape[0], x.shape[1], n_g, d).transpose(1, 2)
        model = AttentionErrorModel(q, k, v, ctx.wo, ctx.freqs, phase, 1 / d**0.5, ctx.window)
        basis, _ = greedy_rope_basis(model, gram, rope_weight, n_g, d, rope_dim)
    return LayerObjective(
        rope_basis=basis,
        rope_weight=rope_weight,
        nope_phase=phase,
        key_metric=group_query_metric(wq, calib.moment, n_g),
        value_metric=group_output_metric(ctx.wo, n_g, d),
    )


def convert_layer(src: SourceAttention, calib: LayerCalibration, settings: LayerSettings, method: str,
                  ctx: LayerContext, search_freqfold: bool) -> ConvertedAttention:
    """Convert one layer with a calibrated ``method``, keeping the candidate (FreqFold, and for ``gqla``
    the key/value balance) whose attention output on the sample sequences is closest to the source's."""
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"unknown calibrated method {method!r}")
    if method == "transmla":
        ffs = freqfold_candidates(src.head_dim, settings.qk_rope_head_dim) if search_freqfold else [settings.freqfold]
        candidates = [(replace(settings, freqfold=ff), None) for ff in ffs]
    else:  # the greedy RoPE choice replaces FreqFold
        base = gqla_objective(src, calib, ctx, settings.qk_rope_head_dim)
        candidates = [(settings, replace(base, kv_balance=b)) for b in BALANCE_GRID]
    best = None
    # gqla reconstructs keys and values where attention reads them (attention-weighted moment).
    moment = calib.attention_moment if method == "gqla" and calib.attention_moment is not None else calib.moment
    for s, obj in candidates:
        conv = convert_attention(src, moment, s, obj)
        err = attention_output_error(src, conv, ctx, calib.samples)
        if best is None or err < best[0]:
            best = (err, conv, s, obj)
    err, conv, s, obj = best
    conv.report.update(attn_output_rel_error=err, freqfold=s.freqfold)
    if obj is not None:
        conv.report["kv_balance"] = obj.kv_balance
    return conv
