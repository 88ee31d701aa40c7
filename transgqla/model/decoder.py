"""A plain-torch GQLA decoder (Llama-style blocks: RMSNorm, SwiGLU MLP) with either decoding path.

It exists to check conversions independently of any runtime: ``verify`` and ``export`` compare
runtimes against it and tests compare it against stock transformers models of the source.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from .attention import KVCache, attention
from .geometry import GQLAGeometry

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalize in float32, scale by ``weight`` in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class GQLADecoder:
    """Holds every tensor of a (small) GQLA checkpoint in memory; ``forward`` runs prefill or decode."""

    def __init__(self, config: dict, tensors: Mapping[str, torch.Tensor], dtype=torch.float32, device="cpu"):
        self.config = config
        self.geo = GQLAGeometry.from_config(config)
        self.t = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        self.dtype, self.device = dtype, torch.device(device)
        if self.geo.hidden_act not in ACTIVATIONS:
            raise ValueError(f"activation {self.geo.hidden_act!r} is not supported")
        self.act = ACTIVATIONS[self.geo.hidden_act]

    def layer(self, idx: int, prefix: str = "") -> dict[str, torch.Tensor]:
        head = f"model.layers.{idx}.{prefix}"
        return {k[len(head):]: v for k, v in self.t.items() if k.startswith(head)}

    def lm_head(self) -> torch.Tensor:
        w = self.t.get("lm_head.weight")
        return self.t["model.embed_tokens.weight"] if w is None else w

    def new_cache(self, path: str) -> KVCache:
        return KVCache(path)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``input_ids[B, T]`` following the tokens already in ``cache``."""
        geo = self.geo
        input_ids = input_ids.to(self.device)
        start = cache.length()
        positions = torch.arange(start, start + input_ids.shape[1], device=self.device)
        h = self.t["model.embed_tokens.weight"][input_ids]
        for i in range(geo.n_layers):
            attn_p = self.layer(i, "self_attn.")
            x = rms_norm(h, self.t[f"model.layers.{i}.input_layernorm.weight"], geo.eps)
            h = h + attention(x, attn_p, geo, positions, cache, i, cache.path)
            x = rms_norm(h, self.t[f"model.layers.{i}.post_attention_layernorm.weight"], geo.eps)
            mlp = self.layer(i, "mlp.")
            gated = self.act(torch.nn.functional.linear(x, mlp["gate_proj.weight"], mlp.get("gate_proj.bias")))
            up = torch.nn.functional.linear(x, mlp["up_proj.weight"], mlp.get("up_proj.bias"))
            h = h + torch.nn.functional.linear(gated * up, mlp["down_proj.weight"], mlp.get("down_proj.bias"))
        h = rms_norm(h, self.t["model.norm.weight"], geo.eps)
        return torch.nn.functional.linear(h, self.lm_head())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, path: str) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill once, then one token per step."""
        cache = self.new_cache(path)
        logits = self.forward(input_ids, cache)
        out = [input_ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = self.forward(nxt, cache)
        return torch.cat(out, dim=1)
