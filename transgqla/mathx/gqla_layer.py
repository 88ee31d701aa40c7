"""Convert one GQA attention layer into GQLA weights (DESIGN.md sections 3 and 4).

Shapes, for hidden ``D``, ``n_h`` query heads, ``n_g`` groups, head dim ``d``, RoPE dim ``d_R``,
latent rank ``r``; ``d_nope = d_v = d``. Arithmetic is ``LayerSettings.work_dtype`` (float64 unless
asked otherwise) except the eigensolves (mathx/lowrank.py); callers cast on write.

Output tensors (names relative to ``self_attn.``):
  ``q_proj.weight [n_h (d + d_R), D]``       per head: d nope rows (the source query), d_R RoPE rows
  ``kv_a_proj_with_mqa.weight [r + d_R, D]`` latent rows, then interleaved RoPE-key rows
  ``kv_b_proj.weight [n_g (d + d), r]``      per group: nope-key rows, then value rows
  and, when the source has q/k/v biases, the matching ``*.bias``.

Biases: the query bias is carried exactly; the RoPE-key bias lands in ``kv_a_proj_with_mqa.bias``;
the nope-key bias is dropped, exactly, because it adds the same amount to every score of a query
(softmax is shift invariant); the value bias goes to ``kv_b_proj.bias`` (attention weights sum to one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .linalg import moment_trace
from .lowrank import EIGEN_DTYPE, Factorization, factorize
from .metric_latent import MetricLatent
from .moments import InputMoment, augment
from .rorope import rope_basis


@dataclass
class SourceAttention:
    """One layer's GQA projections, as stored: ``wq[n_h*d, D]``, ``wk``/``wv`` ``[n_g*d, D]``."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    n_heads: int
    n_groups: int
    head_dim: int
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    softmax_scale: float | None = None  # None: 1/sqrt(head_dim)

    @property
    def has_bias(self) -> bool:
        return self.bq is not None or self.bk is not None or self.bv is not None


@dataclass
class LayerSettings:
    kv_lora_rank: int
    qk_rope_head_dim: int
    freqfold: int
    balance_kv: bool = True
    # Arithmetic of the weight-sized products. float64 by default (calibrated conversions, tests);
    # data-free conversions use float32: their statistics are themselves a heuristic, the output is
    # usually bf16, and it halves the time and memory of a layer (measured in benchmarks/README.md).
    work_dtype: torch.dtype = torch.float64


@dataclass
class LayerObjective:
    """What the conversion minimizes beyond plain key/value energy (all optional).

    ``rope_weight[n_g, d/2]``: cost of losing RoPE per unit of key energy, per group and frequency
    (FreqFold then keeps the components that are costliest to drop). ``nope_phase[n_g, d/2]``
    (complex): the factor that best stands in for the rotation a dropped pair no longer gets,
    folded into the nope key. ``key_metric``/``value_metric`` ``[n_g, d, d]``: output metrics of
    the factorization (query second moment of the group's heads; ``sum_h W_O,h^T W_O,h``).
    ``kv_balance``: weight of key error against value error (None: TransMLA's energy balance).
    """

    rope_weight: torch.Tensor | None = None
    rope_basis: torch.Tensor | None = None  # [n_g*d, d_R]: an explicit RoPE subspace (overrides FreqFold)
    nope_phase: torch.Tensor | None = None
    key_metric: torch.Tensor | None = None
    value_metric: torch.Tensor | None = None
    kv_balance: float | None = None


def apply_phase(w: torch.Tensor, phase: torch.Tensor, n_groups: int, head_dim: int) -> torch.Tensor:
    """Multiply each group's complex pair ``(i, i + d/2)`` of key rows ``w[n_g*d, C]`` by ``phase[n_g, d/2]``."""
    half = head_dim // 2
    w = w.reshape(n_groups, head_dim, -1)
    re, im = w[:, :half], w[:, half:]
    a, b = phase.real[..., None].to(w.dtype), phase.imag[..., None].to(w.dtype)
    return torch.cat((a * re - b * im, b * re + a * im), dim=1).reshape(n_groups * head_dim, -1)


@dataclass
class ConvertedAttention:
    tensors: dict[str, torch.Tensor]  # work dtype, names relative to self_attn.
    report: dict[str, float] = field(default_factory=dict)


def max_rank(n_groups: int, head_dim: int, rope_dim: int, hidden: int) -> int:
    """Largest useful ``kv_lora_rank``: the joint nope-key/value map has rank at most this."""
    return min(2 * n_groups * head_dim - rope_dim, hidden)


@dataclass
class KeySplit:
    """Steps 1-3 of a layer: the RoPE subspace and what the latent must carry.

    ``basis[n_g d, d_R]`` (interleaved slot columns), ``w_rope[d_R, D+1]`` (the RoPE key, bias column last),
    ``joint[2 n_g d, D+1]``: per-group nope keys (phase applied) then values, bias columns zero (the nope-key
    bias is softmax-invariant, the value bias travels in ``value_bias[n_g d]``).
    """

    basis: torch.Tensor
    w_rope: torch.Tensor
    joint: torch.Tensor
    value_bias: torch.Tensor
    energy_kept: float


def split_keys(src: SourceAttention, moment: InputMoment, settings: LayerSettings,
               objective: LayerObjective | None = None) -> KeySplit:
    """RoRoPE/FreqFold (or ``objective.rope_basis``), then the RoPE/nope split."""
    obj = objective or LayerObjective()
    n_g, d, dt = src.n_groups, src.head_dim, settings.work_dtype
    wk = augment(src.wk, src.bk, dt)  # [n_g*d, D+1]
    wv = augment(src.wv, src.bv, dt)
    # Data-free, the key Gram only ranks components for FreqFold, so float32 serves (see mathx/lowrank.py).
    key_gram = moment.gram(wk, dtype=EIGEN_DTYPE if moment.diag is not None else dt).double()
    if obj.rope_basis is not None:
        v_basis = obj.rope_basis.double()
        energy_kept = float(torch.trace(v_basis.T @ key_gram @ v_basis) / torch.trace(key_gram).clamp_min(1e-300))
    else:
        rb = rope_basis(key_gram, n_g, d, settings.qk_rope_head_dim, settings.freqfold, obj.rope_weight)
        v_basis, energy_kept = rb.basis, rb.energy_kept  # [n_g*d, d_R]
    v_basis = v_basis.to(dt)
    w_rope = v_basis.T @ wk  # [d_R, D+1] RoPE key, interleaved slots
    w_nope = wk - v_basis @ w_rope  # [n_g*d, D+1] per-group nope keys
    if obj.nope_phase is not None:
        w_nope = apply_phase(w_nope, obj.nope_phase, n_g, d)
    w_nope[:, -1] = 0.0  # nope-key bias: softmax-invariant, dropped
    value_bias = wv[:, -1].clone()
    wv[:, -1] = 0.0  # value bias travels exactly in kv_b_proj.bias
    return KeySplit(v_basis, w_rope, torch.cat((w_nope, wv), dim=0), value_bias, energy_kept)


def factorize_latent(split: KeySplit, moment: InputMoment, settings: LayerSettings,
                     objective: LayerObjective | None = None) -> tuple[Factorization, float, float]:
    """Step 4: the rank-``r`` joint latent; returns it with the plain key and value energies."""
    obj = objective or LayerObjective()
    half, dt = split.joint.shape[0] // 2, settings.work_dtype
    if obj.key_metric is not None and obj.value_metric is not None:
        latent = MetricLatent(split.joint, moment, obj.key_metric, obj.value_metric)
        return latent.factorize(settings.kv_lora_rank, obj.kv_balance or 1.0), latent.key_energy, latent.value_energy
    e_k, e_v = moment_trace(split.joint[:half], moment), moment_trace(split.joint[half:], moment)
    row_weight = None
    if settings.balance_kv and e_k > 0 and e_v > 0:
        alpha = math.sqrt(e_v / e_k) * math.sqrt(obj.kv_balance or 1.0)
        row_weight = torch.cat((torch.full((half,), alpha, dtype=dt, device=split.joint.device),
                                torch.ones(half, dtype=dt, device=split.joint.device)))
    return factorize(split.joint, moment, settings.kv_lora_rank, row_weight), e_k, e_v


def assemble(src: SourceAttention, split: KeySplit, fac: Factorization, settings: LayerSettings,
             e_k: float, e_v: float) -> ConvertedAttention:
    """Step 5 and the output tensors: queries (source query as the nope part, its share of the RoPE slots),
    rescaled so that the softmax scale ``1/sqrt(d + d_R)`` reproduces the source's; written straight into
    the output layout (no augmented ``[n_h, d + d_R, D+1]`` temporaries: the query is the largest matrix)."""
    n_h, n_g, d = src.n_heads, src.n_groups, src.head_dim
    d_r, r, dt = settings.qk_rope_head_dim, settings.kv_lora_rank, settings.work_dtype
    m = n_h // n_g
    up_k = fac.up[: n_g * d].reshape(n_g, d, r)
    up_v = fac.up[n_g * d :].reshape(n_g, d, r)
    src_scale = src.softmax_scale if src.softmax_scale is not None else 1 / math.sqrt(d)
    q_mult = src_scale * math.sqrt(d + d_r)
    v_heads = split.basis.reshape(n_g, d, d_r).repeat_interleave(m, dim=0).transpose(1, 2)  # [n_h, d_R, d]
    wq = src.wq.to(dt).reshape(n_h, d, -1)
    q_w = torch.empty(n_h, d + d_r, wq.shape[-1], dtype=dt, device=wq.device)
    torch.mul(wq, q_mult, out=q_w[:, :d])
    torch.bmm(v_heads, wq, out=q_w[:, d:])
    q_w[:, d:] *= q_mult

    out = {
        "q_proj.weight": q_w.reshape(n_h * (d + d_r), -1),
        "kv_a_proj_with_mqa.weight": torch.cat((fac.down[:, :-1], split.w_rope[:, :-1]), dim=0),
        "kv_b_proj.weight": torch.cat((up_k, up_v), dim=1).reshape(n_g * 2 * d, r),
    }
    if src.has_bias:
        bq = torch.zeros(n_h, d, dtype=dt, device=wq.device) if src.bq is None else src.bq.to(dt).reshape(n_h, d)
        out["q_proj.bias"] = torch.cat((bq, (v_heads @ bq[..., None])[..., 0]), dim=1).mul(q_mult).reshape(-1)
        out["kv_a_proj_with_mqa.bias"] = torch.cat((fac.down[:, -1], split.w_rope[:, -1]))
        kv_b_bias = torch.zeros(n_g, 2 * d, dtype=dt, device=wq.device)
        kv_b_bias[:, d:] = split.value_bias.reshape(n_g, d)
        out["kv_b_proj.bias"] = kv_b_bias.reshape(-1)
    report = {
        "rope_energy_kept": split.energy_kept,
        "kv_energy_captured": fac.captured,
        "key_nope_rel_error": float(fac.row_residual[: n_g * d].sum()) / max(e_k, 1e-300),
        "value_rel_error": float(fac.row_residual[n_g * d :].sum()) / max(e_v, 1e-300),
    }
    return ConvertedAttention(tensors=out, report=report)


def convert_attention(
    src: SourceAttention, moment: InputMoment, settings: LayerSettings, objective: LayerObjective | None = None
) -> ConvertedAttention:
    """Run RoRoPE/FreqFold, the RoPE/nope split, the joint K/V factorization and scale folding."""
    split = split_keys(src, moment, settings, objective)
    fac, e_k, e_v = factorize_latent(split, moment, settings, objective)
    return assemble(src, split, fac, settings, e_k, e_v)
