"""Gemma2: sandwich norms, ``1 + w`` RMSNorm weights, scaled embeddings and soft-capped logits.

Per layer four norms: ``input_layernorm`` before attention, ``post_attention_layernorm`` on the
attention output, ``pre_feedforward_layernorm`` before the MLP, ``post_feedforward_layernorm`` on its
output. Embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the hidden dtype; the MLP's
activation is ``hidden_activation``; the softmax scale is ``query_pre_attn_scalar ** -0.5`` (folded
into the GQLA query weights by the usual scale fold); attention scores are soft-capped by
``attn_logit_softcapping`` and the logits by ``final_logit_softcapping``; ``layer_types`` alternates
sliding-window and full attention. The head is tied to the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Block, Family


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Gemma2(Family):
    def refuse(self, config: dict[str, Any]) -> None:
        return None  # soft-caps and the query scalar are this family's own block settings

    def block_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            "query_scalar": _optional_float(config.get("query_pre_attn_scalar")),
            "attn_softcap": _optional_float(config.get("attn_logit_softcapping")),
            "final_softcap": _optional_float(config.get("final_logit_softcapping")),
        }


FAMILIES = (
    Gemma2("gemma2", ("Gemma2ForCausalLM",), qkv_bias=None, activation_key="hidden_activation",
           block_template=Block("gemma2", attn_out="post_attention_layernorm", mlp_in="pre_feedforward_layernorm",
                                mlp_out="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True,
                                tie_embeddings=True, activation="gelu_pytorch_tanh")),
)
