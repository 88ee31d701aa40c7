"""The tensors a GQLA config implies: names and shapes, required or optional.

Why its own room: ``verify`` checks a checkpoint against it, and ``convert`` checks its plan against it before
writing anything, so that convert never writes a tensor its own verify would call "not part of the format".
Attention comes from the format (:func:`transgqla.format.attention_tensors`), the rest of the block from the
source family's record (``gqla.family``, :func:`transgqla.families.gqla_block`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .families import gqla_block
from .format import attention_tensors


@dataclass
class Expected:
    required: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]]


def expected_tensors(cfg: dict[str, Any]) -> Expected:
    """Tensor names and shapes a contract-valid config implies (shapes in ``[out, in]`` order)."""
    D, V, I = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]  # noqa: E741 (the paper's names)
    L = cfg["num_hidden_layers"]
    block = gqla_block(cfg)  # every weight outside attention, named by the source family's block
    req: dict[str, tuple[int, ...]] = block.copied_weights(L, V, D, I)
    opt: dict[str, tuple[int, ...]] = {}
    if block.tie_embeddings:
        opt[block.head] = (V, D)
    mlp_bias = bool(cfg.get("mlp_bias"))
    attn_required, attn_optional = attention_tensors(cfg)
    for layer in range(L):
        pre, att = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn."
        if mlp_bias:
            req.update({pre + "mlp.gate_proj.bias": (I,), pre + "mlp.up_proj.bias": (I,),
                        pre + "mlp.down_proj.bias": (D,)})
        req.update({att + rel: shape for rel, shape in attn_required.items()})
        opt.update({att + rel: shape for rel, shape in attn_optional.items()})
    return Expected(req, opt)
