"""Per-layer attention tensors of a DeepSeek-V3 export, for both targets (see :mod:`.latent_norm`).

Shapes (``r`` GQLA rank, ``n_h`` heads, ``n_g`` groups, ``m = n_h / n_g``, ``D`` hidden):

=========================  ==========================================  =======================================
tensor                     ``engines`` target                          ``transformers`` target
=========================  ==========================================  =======================================
kv_a_proj_with_mqa.weight  ``[r + d_R, D]``: ``alpha W_DKV ; W_KR``    ``[r + 1 + d_R, D]``: ``W_DKV ; 0 ; W_KR``
kv_a_proj_with_mqa.bias    --                                          ``[b_DKV ; M ; b_KR]``
kv_a_layernorm.weight      ``[r]``: ``sqrt(eps) / alpha``              ``[r + 1]``: ``w ... w, 0``
kv_b_proj.weight           ``[n_h (d_nope + d_v), r]``                 ``[n_h (d_nope + d_v), r + 1]`` (last col 0)
o_proj.bias                --                                          ``b_O + W_O b_V`` (value bias folded)
=========================  ==========================================  =======================================

``kv_b_proj`` replicates group ``h // m``'s block for head ``h`` (MLA indexes up-projections per head),
divided by the norm's residual scale when that is folded. A nope-key bias only shifts every score of a
query by the same amount (softmax ignores it): dropped. A value bias is exact through ``o_proj.bias``
because attention probabilities sum to one.
"""

from __future__ import annotations

import math

import torch

from .latent_norm import LATENT_NORM_EPS, LinearNorm, NormPin
from .source import GQLACheckpoint


def replicated_kv_b(src: GQLACheckpoint, layer: int, scale: float, folded: bool) -> torch.Tensor:
    """``[n_h, d_nope + d_v, r]``: group blocks repeated per head (bytes copied unless ``folded``)."""
    geo = src.geo
    b = src.ckpt.read(src.attn(layer, "kv_b_proj.weight")).view(geo.n_groups, geo.d_nope + geo.d_v, geo.rank)
    if folded:
        b = (b.to(torch.float64) / scale).to(b.dtype)
    return b.repeat_interleave(geo.heads_per_group, dim=0)


def engines_layer(src: GQLACheckpoint, layer: int, norm: LinearNorm) -> dict[str, torch.Tensor]:
    """Bias-free tensors, ``kv_lora_rank = r`` (names relative to ``self_attn.``, in the checkpoint dtype)."""
    geo = src.geo
    a = src.ckpt.read(src.attn(layer, "kv_a_proj_with_mqa.weight"))
    latent = (a[: geo.rank].to(torch.float64) * norm.alpha).to(a.dtype)  # alpha = 2^k: exact
    kv_b = replicated_kv_b(src, layer, norm.scale, norm.folded)
    return {
        "kv_a_proj_with_mqa.weight": torch.cat((latent, a[geo.rank :])),
        "kv_a_layernorm.weight": torch.full((geo.rank,), norm.weight, dtype=a.dtype),
        "kv_b_proj.weight": kv_b.reshape(-1, geo.rank),
    }


def pinned_layer(src: GQLACheckpoint, layer: int, pin: NormPin) -> dict[str, torch.Tensor]:
    """Constant-coordinate tensors, ``kv_lora_rank = r + 1``, with biases (float64; the caller casts)."""
    geo = src.geo
    r1 = geo.rank + 1
    a = src.ckpt.read(src.attn(layer, "kv_a_proj_with_mqa.weight"))
    kv_a = torch.cat((a[: geo.rank], torch.zeros(1, geo.hidden, dtype=a.dtype), a[geo.rank :]))
    a_bias = src.read64(src.attn(layer, "kv_a_proj_with_mqa.bias"))
    if a_bias is None:
        a_bias = torch.zeros(geo.rank + geo.d_rope, dtype=torch.float64)
    kv_a_bias = torch.cat((a_bias[: geo.rank], torch.tensor([pin.bias], dtype=torch.float64), a_bias[geo.rank :]))
    norm_w = torch.full((r1,), pin.weight, dtype=torch.float64)
    norm_w[-1] = 0.0
    b = replicated_kv_b(src, layer, pin.scale, pin.folded)
    kv_b = torch.cat((b, torch.zeros(geo.n_heads, geo.d_nope + geo.d_v, 1, dtype=b.dtype)), dim=2)
    o_bias = src.read64(src.attn(layer, "o_proj.bias"))
    o_bias = torch.zeros(geo.hidden, dtype=torch.float64) if o_bias is None else o_bias
    b_bias = src.read64(src.attn(layer, "kv_b_proj.bias"))
    if b_bias is not None:
        b_v = b_bias.view(geo.n_groups, geo.d_nope + geo.d_v)[:, geo.d_nope :].repeat_interleave(geo.heads_per_group, dim=0)
        o_bias = o_bias + src.read64(src.attn(layer, "o_proj.weight")) @ b_v.reshape(-1)
    return {
        "kv_a_proj_with_mqa.weight": kv_a, "kv_a_proj_with_mqa.bias": kv_a_bias, "kv_a_layernorm.weight": norm_w,
        "kv_b_proj.weight": kv_b.reshape(-1, r1), "o_proj.bias": o_bias,
    }


def query_lora(src: GQLACheckpoint, layer: int, pin: NormPin, tdt: torch.dtype) -> dict[str, torch.Tensor]:
    """``q_a_proj`` (+bias), ``q_a_layernorm``, ``q_b_proj`` carrying ``q_proj`` and its bias exactly
    (``transformers`` target only): ``q_lora_rank = D + 1``, ``q_a_proj = [I ; 0]`` with bias ``[0 ; M_q]``,
    ``q_a_layernorm`` pinned like the latent norm (weight ``w_q`` on the ``D`` real dims, 1 on the constant
    one), ``q_b_proj = [W_q | b_q / u]`` with ``u = sqrt(D + 1) M_q / sqrt(M_q^2 + (D + 1) eps)``."""
    d = src.geo.hidden
    w_q = src.read64(src.attn(layer, "q_proj.weight"))
    b_q = src.read64(src.attn(layer, "q_proj.bias"))
    b_q = torch.zeros(w_q.shape[0], dtype=torch.float64) if b_q is None else b_q
    q_a = torch.cat((torch.eye(d, dtype=tdt), torch.zeros(1, d, dtype=tdt)))
    q_a_bias = torch.zeros(d + 1, dtype=torch.float64)
    q_a_bias[-1] = pin.bias
    norm_w = torch.full((d + 1,), pin.weight, dtype=torch.float64)
    norm_w[-1] = 1.0
    u = math.sqrt(d + 1) * pin.bias / math.sqrt(pin.bias**2 + (d + 1) * LATENT_NORM_EPS)
    w = src.ckpt.read(src.attn(layer, "q_proj.weight"))
    if pin.folded:
        w = (w_q / pin.scale).to(tdt)
    q_b = torch.cat((w.to(tdt), (b_q / u).to(tdt)[:, None]), dim=1)
    return {"q_a_proj.weight": q_a, "q_a_proj.bias": q_a_bias.to(tdt), "q_a_layernorm.weight": norm_w.to(tdt),
            "q_b_proj.weight": q_b}
