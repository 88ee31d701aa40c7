"""Granite: a Llama block with four scalars: the softmax scale itself (``attention_multiplier``),
an embedding multiplier, a residual multiplier on both branch outputs and a logits divisor
(``logits_scaling``). The softmax scale is folded into the GQLA query weights like any other; the
other three are block settings the reference decoder and the runtime apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Family


@dataclass(frozen=True)
class Granite(Family):
    def block_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        def get(key: str) -> float | None:  # a multiplier of 1 is no multiplier (a plain Llama block there)
            value = float(config.get(key, 1.0))
            return None if value == 1.0 else value

        return {"attention_scale": float(config.get("attention_multiplier", 1.0)),
                "embed_multiplier": get("embedding_multiplier"),
                "residual_multiplier": get("residual_multiplier"), "logits_divisor": get("logits_scaling")}


FAMILIES = (Granite("granite", ("GraniteForCausalLM",), qkv_bias=None),)
