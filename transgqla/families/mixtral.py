"""Mixtral: Mistral's attention and norms with a sparse mixture of experts in place of the MLP.

Conversion touches only attention; the router (``block_sparse_moe.gate``) and every expert
(``block_sparse_moe.experts.{e}.w1/w3/w2`` = gate/up/down, the hub layout ``save_pretrained``
writes) are copied byte for byte. Routing, as transformers does it: softmax of the router logits in
float32, the ``num_experts_per_tok`` largest, renormalized to sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import Block, Family, Mlp

MOE = Mlp(kind="moe", module="block_sparse_moe", gate="w1", up="w3", down="w2", router="gate", experts="experts")


@dataclass(frozen=True)
class Mixtral(Family):
    def block_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        n, k = int(config.get("num_local_experts", 8)), int(config.get("num_experts_per_tok", 2))
        return {"mlp": Mlp(**{**MOE.__dict__, "n_experts": n, "top_k": k})}


FAMILIES = (Mixtral("mixtral", ("MixtralForCausalLM",), qkv_bias=False, block_template=Block("mixtral", mlp=MOE)),)
