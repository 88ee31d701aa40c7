"""The source's GQA attention in plain torch, with its KV cache, for every family.

Used as the reference the conversion is measured against (verify's fidelity checks, calibration,
perplexity of the source) without loading any runtime. The geometry derives from the one validated
reading of the config (:class:`~transgqla.source_geometry.SourceGeometry`); a fused ``qkv_proj``
(Phi-3) is split by the family before it gets here, so the attention sees ``q_proj``/``k_proj``/``v_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..families import Block
from ..mathx.decode_kernels import gqa_attention as grouped_attention
from ..mathx.rope import cos_sin, inv_freq, rotate_half_layout
from ..source_geometry import SourceGeometry, read_geometry
from .attention import KVCache, causal_mask


@dataclass
class GQAGeometry:
    """Per-layer attention geometry of a source; ``sliding_window`` is that of the layer it was made
    for (:meth:`for_layer`), ``softcap`` the family's attention-logit soft-cap."""

    hidden: int
    n_heads: int
    n_groups: int
    head_dim: int
    n_layers: int
    eps: float
    freqs: torch.Tensor
    softmax_scale: float
    block: Block
    sliding_window: int | None = None
    softcap: float | None = None

    @property
    def hidden_act(self) -> str:
        return self.block.activation

    @property
    def tie_embeddings(self) -> bool:
        return self.block.tie_embeddings

    @classmethod
    def from_source(cls, sg: SourceGeometry) -> "GQAGeometry":
        return cls(hidden=sg.hidden, n_heads=sg.n_heads, n_groups=sg.n_groups, head_dim=sg.head_dim,
                   n_layers=sg.n_layers, eps=sg.block.eps, freqs=inv_freq(sg.head_dim, sg.rope_base, sg.rope_scaling),
                   softmax_scale=sg.softmax_scale, block=sg.block, sliding_window=sg.block.window(0),
                   softcap=sg.block.attn_softcap)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "GQAGeometry":
        return cls.from_source(read_geometry(cfg))

    def for_layer(self, layer: int) -> "GQAGeometry":
        return replace(self, sliding_window=self.block.window(layer))


def gqa_attention(x, p, geo: GQAGeometry, positions, cache: KVCache, layer: int) -> torch.Tensor:
    """Stock grouped-query attention of ``x[B,T,D]``; caches rotated ``k`` and ``v`` ``[B,n_g,S,d]``."""
    b, t, _ = x.shape
    d = geo.head_dim

    def proj(name: str, heads: int) -> torch.Tensor:
        y = torch.nn.functional.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
        return y.view(b, t, heads, d).transpose(1, 2)

    cos, sin = cos_sin(geo.freqs, positions, dtype=x.dtype)
    q = rotate_half_layout(proj("q_proj", geo.n_heads), cos, sin)
    k = rotate_half_layout(proj("k_proj", geo.n_groups), cos, sin)
    k_all, v_all = cache.extend(layer, k, proj("v_proj", geo.n_groups))
    mask = causal_mask(positions, k_all.shape[2], geo.sliding_window)
    out = grouped_attention(q, k_all, v_all, mask, geo.softmax_scale, geo.softcap)  # no per-head cache copies
    out = out.transpose(1, 2).reshape(b, t, geo.n_heads * d)
    return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))
