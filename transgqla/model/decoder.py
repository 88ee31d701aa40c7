"""Plain-torch decoders around either attention, for every family's block.

They exist to check conversions independently of any runtime: ``verify`` and ``export`` compare
runtimes against :class:`GQLADecoder`, tests compare it with stock transformers models of the
source, and :class:`SourceDecoder` is the source reference for fidelity and perplexity. The block
(norm names and convention, sandwich norms, MLP kind, embedding scale, soft-caps, per-layer sliding
windows) comes from the family's :class:`~transgqla.families.Block` (:mod:`.block`); one block forward,
:meth:`Decoder.block`, serves every layer-by-layer consumer.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..families import BY_NAME, Block
from .attention import KVCache, attention
from .block import ACTIVATIONS, embed_scale, mlp, rms_norm, softcap
from .geometry import GQLAGeometry
from .source_attention import GQAGeometry, gqa_attention

__all__ = ["ACTIVATIONS", "Decoder", "GQLADecoder", "SourceDecoder", "rms_norm"]


class Decoder:
    """Holds a (small) checkpoint's tensors in memory; ``forward`` runs prefill or cached decode."""

    cache_path = "source"

    def __init__(self, config: dict, tensors: Mapping[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        self.config = config
        self.geo = self._geometry(config)
        self.spec: Block = self.geo.block
        if isinstance(tensors, dict):
            self.t = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        else:  # a lazy mapping (e.g. CheckpointTensors) that reads and casts on access
            self.t = tensors
        self.dtype, self.device = dtype, torch.device(device)
        if self.spec.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.spec.activation!r} is not supported")
        self.act = ACTIVATIONS[self.spec.activation]

    def _geometry(self, config):
        raise NotImplementedError

    def _attention(self, x, params, positions, cache: KVCache, layer: int, geo=None) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, idx: int, prefix: str = "") -> dict[str, torch.Tensor]:
        """Layer ``idx``'s tensors under ``prefix``, names relative to it; ``self_attn.`` answers the
        attention as q/k/v/o even where the family fuses q/k/v (:meth:`attention_params`)."""
        if prefix == "self_attn.":
            return self.attention_params(idx)
        return self._under(idx, prefix)

    def _under(self, idx: int, prefix: str) -> dict[str, torch.Tensor]:
        head = f"model.layers.{idx}.{prefix}"
        return {k[len(head):]: self.t[k] for k in self.t if k.startswith(head)}

    def attention_params(self, idx: int) -> dict[str, torch.Tensor]:
        p = self._under(idx, "self_attn.")
        fused = self.spec.qkv
        if fused and f"{fused}.weight" in p:
            fam = BY_NAME[self.spec.family]  # the family's split hook
            for kind in ("weight", "bias"):
                t = p.pop(f"{fused}.{kind}", None)
                if t is not None:
                    for part, block in zip(("q_proj", "k_proj", "v_proj"),
                                           fam.split_qkv(t, self.geo.n_heads, self.geo.n_groups, self.geo.head_dim)):
                        p[f"{part}.{kind}"] = block
        return p

    def layer_geo(self, i: int):
        """The attention geometry of layer ``i`` (its sliding window)."""
        return self.geo.for_layer(i)

    def head_weight(self) -> torch.Tensor:
        w = self.t.get(self.spec.head)
        return self.t[self.spec.embed] if w is None else w

    lm_head = head_weight

    def new_cache(self, path: str | None = None) -> KVCache:
        return KVCache(path or self.cache_path)

    def norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, weight, self.spec.eps, self.spec.norm_offset)

    def _norm_of(self, i: int, name: str) -> torch.Tensor:
        return self.t[f"model.layers.{i}.{name}.weight"]

    def attention_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """What layer ``i``'s attention sees: its pre-attention norm of ``h``."""
        return self.norm(h, self._norm_of(i, self.spec.attn_in))

    def attention_residual(self, i: int, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``h`` plus the attention output ``a`` (through the sandwich norm where the block has one)."""
        a = self.norm(a, self._norm_of(i, self.spec.attn_out)) if self.spec.attn_out else a
        return h + (a if self.spec.residual_multiplier is None else a * self.spec.residual_multiplier)

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoder layer: normed attention and normed MLP, both residual."""
        a = self._attention(self.attention_input(i, h), self.attention_params(i), positions, cache, i,
                            self.layer_geo(i))
        return self.mlp_residual(i, self.attention_residual(i, h, a))

    def mlp_residual(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``h + MLP(norm(h))`` of layer ``i`` (the MLP output normed where the block says)."""
        x = self.norm(h, self._norm_of(i, self.spec.mlp_in))
        y = mlp(x, self._under(i, self.spec.mlp.module + "."), self.spec, self.act)
        y = self.norm(y, self._norm_of(i, self.spec.mlp_out)) if self.spec.mlp_out else y
        return h + (y if self.spec.residual_multiplier is None else y * self.spec.residual_multiplier)

    def scale_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        scale = embed_scale(self.spec, self.geo.hidden, rows.dtype)
        rows = rows if scale is None else rows * scale.to(rows.device)
        return rows if self.spec.embed_multiplier is None else rows * self.spec.embed_multiplier

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.scale_embeddings(self.t[self.spec.embed][input_ids.to(self.device)])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h, self.t[self.spec.final_norm])

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.spec.logits_divisor is not None:
            logits = logits / self.spec.logits_divisor
        return softcap(logits, self.spec.final_softcap)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.cap_logits(torch.nn.functional.linear(self.final_norm(h), self.head_weight()))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``input_ids[B, T]`` following the tokens already in ``cache``."""
        start = cache.length()
        positions = torch.arange(start, start + input_ids.shape[1], device=self.device)
        h = self.embed(input_ids)
        for i in range(self.geo.n_layers):
            h = self.block(i, h, positions, cache)
        return self.logits(h)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, path: str | None = None) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill once, then one token per step."""
        cache = self.new_cache(path)
        logits = self.forward(input_ids, cache)
        out = [input_ids.to(self.device)]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self.forward(nxt, cache)
        return torch.cat(out, dim=1)


class GQLADecoder(Decoder):
    """A GQLA checkpoint; the cache's ``path`` ("absorb" or "gqa") picks the decoding path."""

    cache_path = "absorb"

    def _geometry(self, config):
        return GQLAGeometry.from_config(config)

    def _attention(self, x, params, positions, cache, layer, geo=None):
        return attention(x, params, geo or self.geo, positions, cache, layer, cache.path)


class SourceDecoder(Decoder):
    """A source GQA checkpoint of any registered family."""

    def _geometry(self, config):
        return GQAGeometry.from_config(config)

    def _attention(self, x, params, positions, cache, layer, geo=None):
        return gqa_attention(x, params, geo or self.geo, positions, cache, layer)
