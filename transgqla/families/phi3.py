"""Phi-3: a Llama block whose q/k/v live in one ``self_attn.qkv_proj`` (rows ``[q ; k ; v]``) and
whose MLP's gate and up projections live in one ``mlp.gate_up_proj`` (rows ``[gate ; up]``).

The fused ``qkv_proj`` is split on read (it is replaced by the GQLA projections); ``gate_up_proj`` is
copied byte for byte and split in half where it is used. Refused with one line: partial rotary
(``partial_rotary_factor < 1``: only part of each head rotates, which GQLA's key split does not model)
and ``longrope`` scaling (its frequencies switch with the sequence length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedError
from .base import Block, Family, Mlp


@dataclass(frozen=True)
class Phi3(Family):
    def refuse(self, config: dict[str, Any]) -> None:
        super().refuse(config)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        factor = (rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
                  if isinstance(rope, dict) else 1.0)
        if float(factor if factor is not None else 1.0) < 1.0:
            raise UnsupportedError(f"config.json: partial_rotary_factor {factor} (partial RoPE) "
                                   "is not supported by the phi3 family")
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if kind in ("longrope", "su"):
            raise UnsupportedError("config.json: 'longrope' RoPE scaling is not supported by the phi3 family "
                                   "(its frequencies change with the sequence length)")


FAMILIES = (
    Phi3("phi3", ("Phi3ForCausalLM",), qkv_bias=False,
         block_template=Block("phi3", qkv="qkv_proj", mlp=Mlp(kind="fused", gate_up="gate_up_proj"))),
)
