"""The reference decoder block of every family, in plain torch: norms, MLPs, embedding, head.

Everything here reads its names and conventions from a :class:`~transgqla.families.Block`; the
attention half lives in :mod:`.attention` (GQLA) and :mod:`.source_attention` (source). Numerics follow
transformers: a ``w`` RMSNorm normalizes in float32 and scales in the input dtype (Llama), a ``1 + w``
one scales in float32 and rounds once (Gemma2); MoE routing takes the softmax in at least float32.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..families import Block, Mlp

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of ``x[..., D]``: ``weight`` (Llama) or ``offset + weight`` (Gemma2's ``1 + w``)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + weight.to(xf.dtype))).to(x.dtype)
    return weight * xf.to(x.dtype)


def _linear(x: torch.Tensor, p: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def gated(x: torch.Tensor, p: Mapping[str, torch.Tensor], spec: Mlp, act, prefix: str = "") -> torch.Tensor:
    """``down(act(gate(x)) * up(x))``; names ``{prefix}{gate|up|down}`` in ``p``."""
    return _linear(act(_linear(x, p, prefix + spec.gate)) * _linear(x, p, prefix + spec.up), p, prefix + spec.down)


def fused(x: torch.Tensor, p: Mapping[str, torch.Tensor], spec: Mlp, act) -> torch.Tensor:
    """Phi-3's MLP: ``gate_up`` holds ``[gate ; up]``; ``down(act(gate) * up)``."""
    gate, up = _linear(x, p, spec.gate_up).chunk(2, dim=-1)
    return _linear(act(gate) * up, p, spec.down)


def moe(x: torch.Tensor, p: Mapping[str, torch.Tensor], spec: Mlp, act) -> torch.Tensor:
    """Mixtral's sparse MoE of ``x[..., D]``: softmax of the router logits (at least float32), the
    ``top_k`` largest renormalized to sum to one, each token through its chosen gated experts."""
    flat = x.reshape(-1, x.shape[-1])
    logits = _linear(flat, p, spec.router)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, idx = torch.topk(probs, spec.top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(spec.n_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            y = gated(flat[rows], p, spec, act, f"{spec.experts}.{e}.")
            out.index_add_(0, rows, (y * top[rows, slot, None]).to(out.dtype))
    return out.view_as(x)


MLPS = {"gated": lambda x, p, spec, act: gated(x, p, spec, act), "fused": fused, "moe": moe}


def mlp(x: torch.Tensor, p: Mapping[str, torch.Tensor], block: Block, act) -> torch.Tensor:
    """The block's MLP; ``p`` holds the tensors under ``block.mlp.module``, names relative to it."""
    return MLPS[block.mlp.kind](x, p, block.mlp, act)


def embed_scale(block: Block, hidden: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Gemma2's ``sqrt(hidden)`` rounded to the hidden dtype (as transformers does), else None."""
    return torch.tensor(hidden**0.5, dtype=dtype) if block.embed_scale else None


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap
