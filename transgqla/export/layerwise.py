"""The export check in bounded memory: OUT and DST run side by side, one decoder layer at a time.

The whole-model check (:func:`.check.run_check` in ``full`` mode) loads both models in float32: about 32 GB each
at 8B. Here each side holds one layer (float32, ~1 GB at 8B) and the ``[1, T, D]`` hidden state:

1. ``h_0``: the prompt's embedding rows, read from each side's own ``embed_tokens`` (a byte copy in every
   export, read once and dropped);
2. for every layer ``l``, in order: the reference block (:class:`~transgqla.model.decoder.GQLADecoder` on
   OUT's layer ``l``, absorb path, no cache) and the candidate block, each applied to its *own* running
   hidden state, so that errors compound through depth as in the full model. The candidate runs the prompt
   as a cached prefill of ``T - 1`` tokens followed by one cached decode step, so the runtime's KV cache is
   exercised too;
3. the final norm of each side (each with its own weight and ``rms_norm_eps``) and the relative error of
   the two ``[T, D]`` results; ``lm_head`` is not multiplied (``V x D`` in float32 is 2 GB at 8B) but checked
   byte for byte against OUT's (or OUT's embedding when tied), streamed through a small buffer.

Candidates: stock transformers decoder layers (DeepSeek-V3, MiMo-V2-Flash) built on the ``meta`` device and
filled with DST's tensors (``load_state_dict(strict=True, assign=True)``: a missing or extra tensor fails),
or :class:`~.check.FoldedGQADecoder` for ``--fold-kv``. No greedy tokens are generated (that would read the
whole model once per token).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UnsupportedError
from ..io import SafetensorsCheckpoint
from ..model.decoder import Decoder, GQLADecoder, rms_norm

BUFFER_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class StockFamily:
    """Where a stock transformers decoder layer lives and how its rotary embedding is called."""

    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class name prefix: <prefix>DecoderLayer, <prefix>RotaryEmbedding
    rotary_kwargs: dict[str, Any]


STOCK = {
    "DeepseekV3ForCausalLM": StockFamily("deepseek_v3", "DeepseekV3", {}),
    "MiMoV2FlashForCausalLM": StockFamily("mimo_v2_flash", "MiMoV2Flash", {"layer_type": "full_attention"}),
}


def _layer_tensors(ckpt: SafetensorsCheckpoint, layer: int, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    head = f"model.layers.{layer}."
    return {n: ckpt.read(n).to(device=device, dtype=dtype) for n in ckpt.names if n.startswith(head)}


def embed_rows(ckpt: SafetensorsCheckpoint, ids: torch.Tensor, device="cpu",
               name: str = "model.embed_tokens.weight") -> torch.Tensor:
    """``[1, T, D]`` float32 embedding rows of ``ids[1, T]`` (the table is read, indexed and dropped)."""
    table = ckpt.read(name)
    rows = table[ids[0]].to(device=device, dtype=torch.float32)[None]
    del table
    return rows


def causal_additive_mask(t_q: int, t_k: int, device="cpu") -> torch.Tensor:
    """``[1, 1, t_q, t_k]``: 0 where query ``i`` (the last ``t_q`` positions) may see key ``j``, else float32 min."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    allowed = torch.arange(t_k, device=device)[None, :] <= q_pos
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


class GQLALayers:
    """Reference (and ``--fold-kv`` candidate): a plain-torch decoder holding one layer at a time."""

    def __init__(self, folder: Path, config: dict, cls: type[Decoder], path: str, device="cpu", cached: bool = False):
        self.ckpt = SafetensorsCheckpoint(folder)
        self.config, self.cls, self.path, self.device, self.cached = config, cls, path, device, cached
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.shape = cls(config, {}, dtype=torch.float32, device=device)  # the family's block conventions

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[1, T, D]`` embeddings, scaled as the family does (Gemma2)."""
        return self.shape.scale_embeddings(embed_rows(self.ckpt, ids, self.device, self.shape.spec.embed))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.shape.norm(h, self.ckpt.read(self.shape.spec.final_norm).float().to(self.device))

    def block(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        dec = self.cls(self.config, _layer_tensors(self.ckpt, layer, device=self.device), dtype=torch.float32, device=self.device)
        t = h.shape[1]
        positions = torch.arange(t, device=self.device)
        cache = dec.new_cache(self.path)
        if not self.cached or t < 2:
            return dec.block(layer, h, positions, cache)
        first = dec.block(layer, h[:, :-1], positions[:-1], cache)
        return torch.cat((first, dec.block(layer, h[:, -1:], positions[-1:], cache)), dim=1)

    def close(self) -> None:
        self.ckpt.close()


class StockLayers:
    """A stock transformers decoder layer per call, on the meta device until DST's tensors are assigned."""

    def __init__(self, folder: Path, architecture: str, device="cpu"):
        from transformers import AutoConfig

        family = STOCK.get(architecture)
        if family is None:
            raise UnsupportedError(f"no layer-by-layer check for {architecture}")
        module = importlib.import_module(f"transformers.models.{family.module}.modeling_{family.module}")
        self.layer_cls = getattr(module, f"{family.prefix}DecoderLayer")
        self.config = AutoConfig.from_pretrained(folder)
        self.config._attn_implementation = "eager"
        self.rotary = getattr(module, f"{family.prefix}RotaryEmbedding")(self.config).to(device)
        self.family, self.device = family, device
        self.ckpt = SafetensorsCheckpoint(folder)
        self.eps = float(self.config.rms_norm_eps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_rows(self.ckpt, ids, self.device)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.ckpt.read("model.norm.weight").float().to(self.device), self.eps)

    def _layer(self, layer: int) -> torch.nn.Module:
        with torch.device("meta"):
            mod = self.layer_cls(self.config, layer)
        head = f"model.layers.{layer}."
        state = {k[len(head):]: v for k, v in _layer_tensors(self.ckpt, layer, device=self.device).items()}
        try:
            mod.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise UnsupportedError(f"stock {self.layer_cls.__name__} does not take layer {layer} of the export: "
                                   f"{str(exc).splitlines()[0]}") from None
        return mod.eval()

    @torch.no_grad()
    def block(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        mod = self._layer(layer)
        cache = DynamicCache(config=self.config)
        t = h.shape[1]
        outs, start = [], 0
        for stop in ((t - 1, t) if t > 1 else (t,)):  # cached prefill of T - 1 tokens, then one decode step
            pos = torch.arange(start, stop, device=self.device)[None]
            x = h[:, start:stop]
            cos_sin = self.rotary(x, pos, **self.family.rotary_kwargs)
            outs.append(mod(x, attention_mask=causal_additive_mask(stop - start, stop, self.device), position_ids=pos,
                            cache=cache, use_cache=True, position_embeddings=cos_sin))
            start = stop
        return torch.cat(outs, dim=1)

    def close(self) -> None:
        self.ckpt.close()


def _stream_hash(ckpt: SafetensorsCheckpoint, name: str, buffer: bytearray) -> str:
    h = hashlib.sha256()
    for piece in ckpt.iter_bytes(name, buffer):
        h.update(piece)
    return h.hexdigest()


def head_bytes_equal(out: SafetensorsCheckpoint, dst: SafetensorsCheckpoint) -> bool:
    """DST's ``lm_head`` holds OUT's bytes (OUT's ``lm_head``, or its embedding when tied)."""
    buffer = bytearray(BUFFER_BYTES)
    theirs = "lm_head.weight" if "lm_head.weight" in out else "model.embed_tokens.weight"
    ours = "lm_head.weight" if "lm_head.weight" in dst else "model.embed_tokens.weight"
    return _stream_hash(out, theirs, buffer) == _stream_hash(dst, ours, buffer)


@torch.no_grad()
def layerwise_outputs(reference: GQLALayers, candidate, ids: torch.Tensor, n_layers: int,
                      progress: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Final-normed ``[T, D]`` of both sides, and the relative error after every layer."""
    h_ref = reference.embed(ids)
    h_cand = candidate.embed(ids).to(reference.device)
    per_layer = []
    for layer in range(n_layers):
        h_ref = reference.block(layer, h_ref)
        h_cand = candidate.block(layer, h_cand)
        err = float((h_cand.double() - h_ref.double()).norm() / h_ref.double().norm().clamp_min(1e-30))
        per_layer.append(err)
        if progress is not None:
            progress(layer, err)
    ref = reference.final_norm(h_ref)
    cand = candidate.final_norm(h_cand).to(reference.device)
    return ref[0].cpu(), cand[0].cpu(), per_layer


def reference_layers(out: Path, config: dict, device="cpu") -> GQLALayers:
    return GQLALayers(out, config, GQLADecoder, "absorb", device)
