"""GQLA layer geometry as read from a GQLA ``config.json`` (the block comes from its ``gqla.family`` record)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..families import Block, gqla_block
from ..mathx.rope import inv_freq, rope_settings


def block_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder-block settings GQLA and source configs share (a disabled sliding window reads as None)."""
    window = None if cfg.get("use_sliding_window") is False else cfg.get("sliding_window")
    return {
        "hidden": int(cfg["hidden_size"]),
        "n_layers": int(cfg["num_hidden_layers"]),
        "eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "sliding_window": int(window) if window else None,
        "hidden_act": str(cfg.get("hidden_act", "silu")),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


@dataclass
class GQLAGeometry:
    hidden: int
    n_heads: int
    n_groups: int
    d_nope: int
    d_rope: int
    d_v: int
    rank: int
    n_layers: int
    eps: float
    freqs: torch.Tensor  # [d_rope/2] float64, rad/token, scaling applied
    sliding_window: int | None  # this layer's (:meth:`for_layer`); layer 0's by default
    hidden_act: str
    tie_embeddings: bool
    block: Block = field(default_factory=lambda: Block("llama"))
    softcap: float | None = None  # attention-logit soft-cap (Gemma2), applied to the scaled scores

    def for_layer(self, layer: int) -> "GQLAGeometry":
        return replace(self, sliding_window=self.block.window(layer))

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.d_nope + self.d_rope)

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_groups

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "GQLAGeometry":
        base, scaling = rope_settings(cfg)
        d_rope = int(cfg["qk_rope_head_dim"])
        block = gqla_block(cfg)
        fields = block_fields(cfg)
        fields.update(eps=block.eps, hidden_act=block.activation, tie_embeddings=block.tie_embeddings,
                      sliding_window=block.window(0) if block.layer_windows else fields["sliding_window"])
        return cls(
            **fields,
            block=block,
            softcap=block.attn_softcap,
            n_heads=int(cfg["num_attention_heads"]),
            n_groups=int(cfg["num_key_value_heads"]),
            d_nope=int(cfg["qk_nope_head_dim"]),
            d_rope=d_rope,
            d_v=int(cfg["v_head_dim"]),
            rank=int(cfg["kv_lora_rank"]),
            freqs=inv_freq(d_rope, base, scaling),
        )

    def cache_values_per_token(self, path: str, replicate_rope: bool = True) -> int:
        """KV-cache values per token per layer on ``path`` (DESIGN.md section 2)."""
        if path == "absorb":
            return self.rank + self.d_rope
        if replicate_rope:
            return self.n_groups * (self.d_nope + self.d_rope + self.d_v)
        return self.n_groups * (self.d_nope + self.d_v) + self.d_rope


def geometry_problems(cfg: dict[str, Any]) -> list[str]:
    """Why the runtime could not be built from a GQLA config that passes the format contract (empty when it
    can): the family record, the norms' eps, the activation, the RoPE frequencies (bad scaling parameters)."""
    from .block import ACTIVATIONS

    try:
        geo = GQLAGeometry.from_config(cfg)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        return [f"the layer geometry cannot be built from config.json ({type(exc).__name__}: {exc})"[:300]]
    p = []
    if geo.block.activation not in ACTIVATIONS:
        p.append(f"activation {geo.block.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if not (math.isfinite(geo.block.eps) and geo.block.eps > 0):
        p.append(f"rms_norm_eps must be a finite positive number, got {geo.block.eps!r}")
    if not bool(torch.isfinite(geo.freqs).all()) or bool((geo.freqs <= 0).any()):
        p.append("the RoPE frequencies (rope_theta and its scaling) are not all finite and positive")
    return p
