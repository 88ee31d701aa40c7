"""Plain-torch decoders (Llama-style blocks: RMSNorm, gated MLP) around either attention.

They exist to check conversions independently of any runtime: ``verify`` and ``export`` compare
runtimes against :class:`GQLADecoder`, tests compare it with stock transformers models of the
source, and :class:`SourceDecoder` is the source reference for fidelity and perplexity.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .attention import KVCache, attention
from .geometry import GQLAGeometry
from .source_attention import GQAGeometry, gqa_attention

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalize in float32, scale by ``weight`` in the input dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder:
    """Holds a (small) checkpoint's tensors in memory; ``forward`` runs prefill or cached decode."""

    cache_path = "source"

    def __init__(self, config: dict, tensors: Mapping[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        self.config = config
        self.geo = self._geometry(config)
        if isinstance(tensors, dict):
            self.t = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        else:  # a lazy mapping (e.g. CheckpointTensors) that reads and casts on access
            self.t = tensors
        self.dtype, self.device = dtype, torch.device(device)
        if self.geo.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.geo.hidden_act!r} is not supported")
        self.act = ACTIVATIONS[self.geo.hidden_act]

    def _geometry(self, config):
        raise NotImplementedError

    def _attention(self, x, params, positions, cache: KVCache, layer: int) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, idx: int, prefix: str = "") -> dict[str, torch.Tensor]:
        head = f"model.layers.{idx}.{prefix}"
        return {k[len(head):]: self.t[k] for k in self.t if k.startswith(head)}

    def lm_head(self) -> torch.Tensor:
        w = self.t.get("lm_head.weight")
        return self.t["model.embed_tokens.weight"] if w is None else w

    def new_cache(self, path: str | None = None) -> KVCache:
        return KVCache(path or self.cache_path)

    def attention_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """What layer ``i``'s attention sees: ``input_layernorm(h)``."""
        return rms_norm(h, self.t[f"model.layers.{i}.input_layernorm.weight"], self.geo.eps)

    def block(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoder layer: pre-norm attention and pre-norm gated MLP, both residual."""
        h = h + self._attention(self.attention_input(i, h), self.layer(i, "self_attn."), positions, cache, i)
        return self.mlp_residual(i, h)

    def mlp_residual(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """``h + MLP(post_attention_layernorm(h))`` of layer ``i``."""
        x = rms_norm(h, self.t[f"model.layers.{i}.post_attention_layernorm.weight"], self.geo.eps)
        mlp = self.layer(i, "mlp.")
        gated = self.act(torch.nn.functional.linear(x, mlp["gate_proj.weight"], mlp.get("gate_proj.bias")))
        up = torch.nn.functional.linear(x, mlp["up_proj.weight"], mlp.get("up_proj.bias"))
        return h + torch.nn.functional.linear(gated * up, mlp["down_proj.weight"], mlp.get("down_proj.bias"))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.t["model.embed_tokens.weight"][input_ids.to(self.device)]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(rms_norm(h, self.t["model.norm.weight"], self.geo.eps), self.lm_head())

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

    def _attention(self, x, params, positions, cache, layer):
        return attention(x, params, self.geo, positions, cache, layer, cache.path)


class SourceDecoder(Decoder):
    """A source GQA checkpoint (Llama, Mistral, Qwen2)."""

    def _geometry(self, config):
        return GQAGeometry.from_config(config)

    def _attention(self, x, params, positions, cache, layer):
        return gqa_attention(x, params, self.geo, positions, cache, layer)
