"""The source's GQA attention (Llama/Mistral/Qwen2) in plain torch, with its KV cache.

Used as the reference the conversion is measured against (verify's fidelity checks, calibration,
perplexity of the source) without loading any runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..mathx.decode_kernels import gqa_attention as grouped_attention
from ..mathx.rope import cos_sin, inv_freq, rope_settings, rotate_half_layout
from .attention import KVCache, causal_mask
from .geometry import block_fields


@dataclass
class GQAGeometry:
    hidden: int
    n_heads: int
    n_groups: int
    head_dim: int
    n_layers: int
    eps: float
    freqs: torch.Tensor
    sliding_window: int | None
    hidden_act: str
    tie_embeddings: bool

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "GQAGeometry":
        base, scaling = rope_settings(cfg)
        n_heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
        return cls(
            **block_fields(cfg),
            n_heads=n_heads,
            n_groups=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            freqs=inv_freq(head_dim, base, scaling),
        )


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
    out = grouped_attention(q, k_all, v_all, mask, geo.softmax_scale)  # no per-head copies of the cache
    out = out.transpose(1, 2).reshape(b, t, geo.n_heads * d)
    return torch.nn.functional.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))
