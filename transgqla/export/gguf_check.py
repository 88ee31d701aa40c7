"""Running a deepseek2 GGUF for the export's reference check: llama.cpp itself, or a torch transcription.

* :func:`llama_cpp_outputs`: ``llama-cpp-python`` (the ``gguf-check`` extra) loads the file and evaluates the
  prompt with ``logits_all=True``; greedy tokens come from its own KV cache, one token per ``eval``.
* :class:`GGUFDecoder`: when llama.cpp is not installed, the same graph written in torch from the file alone
  (geometry from the GGUF metadata, tensors dequantized by the ``gguf`` package on access from the
  memory-mapped file), transcribing llama.cpp's ``deepseek2`` MLA step by step::

      q = attn_q x                     -> per head [q_nope (d_nope) ; q_pe (d_R)]
      [c ; k_pe] = attn_kv_a_mqa x     c: [r], k_pe: [d_R] (one key for all heads)
      c = rms_norm(c, attn_kv_a_norm, eps)          (the file's single rms eps)
      q_pe, k_pe rotated as adjacent pairs at freq_base^(-2p/d_R)
      score_h(s) = ((attn_k_b_h q_nope_h) . c_s + q_pe_h . k_pe_s) / sqrt(key_length_mla)
      o_h = attn_v_b_h (sum_s p_h(s) c_s);   out = attn_output [o_1 ; ... ; o_n_h]

  It does not share code with the GQLA reference (which reads OUT, not the file), so it checks the file's
  names, layouts, metadata and the latent norm; that llama.cpp agrees with this transcription is what the
  tests prove when llama.cpp is installed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..families import Block
from ..mathx.rope import cos_sin, interleaved_layout
from ..model.attention import KVCache, _softmax, causal_mask
from ..model.decoder import Decoder, rms_norm

ARCH = "deepseek2"
_TO_HF = {  # GGUF name suffix in block l -> the decoder's name in layer l
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.weight": "self_attn.attn_q",
    "attn_kv_a_mqa.weight": "self_attn.attn_kv_a_mqa",
    "attn_kv_a_norm.weight": "self_attn.attn_kv_a_norm",
    "attn_k_b.weight": "self_attn.attn_k_b",
    "attn_v_b.weight": "self_attn.attn_v_b",
    "attn_output.weight": "self_attn.attn_output",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # an ImportError, or a broken native library
        return False
    return True


def gguf_fields(reader: Any) -> dict[str, Any]:
    """Every scalar / string metadata value of a ``gguf.GGUFReader`` (arrays: their length)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        out[key] = len(value) if isinstance(value, list) else value
    return out


class GGUFTensors(Mapping):
    """``decoder name -> float32 tensor`` read from the GGUF on access (dequantized; nothing cached)."""

    def __init__(self, reader: Any, device="cpu"):
        self.device = device
        self._by_name: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name in _GLOBAL:
                self._by_name[_GLOBAL[t.name]] = t
                continue
            blk, layer, rest = t.name.split(".", 2)
            if blk != "blk" or rest not in _TO_HF:
                raise ValueError(f"unexpected tensor {t.name} in a deepseek2 GGUF export")
            self._by_name[f"model.layers.{layer}.{_TO_HF[rest]}"] = t

    def __getitem__(self, name: str) -> torch.Tensor:
        import gguf

        t = self._by_name[name]
        shape = tuple(int(n) for n in reversed(t.shape))  # ne order -> torch order
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        # a copy: the map is read-only
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape).to(self.device)

    def __iter__(self):
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name) -> bool:
        return name in self._by_name


@dataclass
class Deepseek2Geometry:
    """What llama.cpp reads from the file's metadata."""

    hidden: int
    n_heads: int
    n_layers: int
    rank: int
    d_rope: int
    d_nope: int
    d_v: int
    eps: float
    freqs: torch.Tensor
    hidden_act: str = "silu"
    sliding_window: int | None = None
    tie_embeddings: bool = False

    @property
    def block(self) -> Block:
        """The decoder block llama.cpp's deepseek2 graph runs: Llama's (the file's tensors are renamed to it)."""
        return Block("llama", eps=self.eps, activation=self.hidden_act, tie_embeddings=self.tie_embeddings)

    def for_layer(self, layer: int) -> "Deepseek2Geometry":
        return self  # every layer attends to the whole context

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> "Deepseek2Geometry":
        a = f"{ARCH}."
        d_rope = int(f[a + "rope.dimension_count"])
        base = float(f[a + "rope.freq_base"])
        freqs = base ** (-torch.arange(0, d_rope, 2, dtype=torch.float64) / d_rope)
        d_k = int(f[a + "attention.key_length_mla"])
        return cls(int(f[a + "embedding_length"]), int(f[a + "attention.head_count"]), int(f[a + "block_count"]),
                   int(f[a + "attention.kv_lora_rank"]), d_rope, d_k - d_rope, int(f[a + "attention.value_length_mla"]),
                   float(f[a + "attention.layer_norm_rms_epsilon"]), freqs)


class GGUFDecoder(Decoder):
    """llama.cpp's deepseek2 MLA graph in torch, on a GGUF file (see the module docstring)."""

    cache_path = "latent"

    def __init__(self, path: Path, device="cpu"):
        import gguf

        self.reader = gguf.GGUFReader(str(path))
        super().__init__(gguf_fields(self.reader), GGUFTensors(self.reader, device), torch.float32, device)

    def _geometry(self, config):
        return Deepseek2Geometry.from_fields(config)

    def _attention(self, x, p, positions, cache: KVCache, layer, geo=None):
        geo = self.geo
        b, t, _ = x.shape
        dq = geo.d_nope + geo.d_rope
        q = torch.nn.functional.linear(x, p["attn_q"]).view(b, t, geo.n_heads, dq).transpose(1, 2)
        kv = torch.nn.functional.linear(x, p["attn_kv_a_mqa"])
        c = rms_norm(kv[..., : geo.rank], p["attn_kv_a_norm"], geo.eps)
        cos, sin = cos_sin(geo.freqs, positions, dtype=x.dtype)
        q_pe = interleaved_layout(q[..., geo.d_nope :], cos, sin)
        k_pe = interleaved_layout(kv[..., geo.rank :], cos, sin)
        c_all, k_all = cache.extend(layer, c[:, None], k_pe[:, None])  # [B, 1, S, r], [B, 1, S, d_R]
        q_abs = torch.einsum("bhtn,hrn->bhtr", q[..., : geo.d_nope], p["attn_k_b"])
        scores = (q_abs @ c_all.transpose(2, 3) + q_pe @ k_all.transpose(2, 3)) / math.sqrt(dq)
        probs = _softmax(scores, causal_mask(positions, c_all.shape[2], None))
        o = torch.einsum("bhtr,hvr->bthv", probs @ c_all, p["attn_v_b"]).reshape(b, t, geo.n_heads * geo.d_v)
        return torch.nn.functional.linear(o, p["attn_output"])


@torch.no_grad()
def torch_outputs(path: Path, ids: torch.Tensor, scored: torch.Tensor, n: int,
                  device="cpu") -> tuple[list[int], torch.Tensor]:
    """(greedy tokens after ``ids``, logits ``[1, T, V]`` of ``scored``) from :class:`GGUFDecoder`."""
    dec = GGUFDecoder(path, device)
    tokens = dec.generate(ids.to(dec.device), n)[0, ids.shape[1]:].tolist() if n else []
    logits = dec.forward(scored.to(dec.device), dec.new_cache())
    return tokens, logits.float().cpu()


def open_llama(path: Path, n_ctx: int, threads: int | None = None, f32_cache: bool = False) -> Any:
    """A ``llama_cpp.Llama`` on ``path`` that keeps every position's logits (CPU, quiet). llama.cpp caches the
    latent in float16 by default (what users run); ``f32_cache`` keeps it in float32 (for exactness tests)."""
    import llama_cpp

    threads = threads or max(1, torch.get_num_threads())
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                           n_threads=threads, n_threads_batch=threads, verbose=False, seed=0, **cache)


def llama_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits of ``ids`` from an empty llama.cpp context."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, decoded one ``eval`` at a time through llama.cpp's KV cache."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def llama_cpp_outputs(path: Path, ids: torch.Tensor, scored: torch.Tensor, n: int,
                      f32_cache: bool = True) -> tuple[list[int], torch.Tensor]:
    """(greedy tokens after ``ids``, logits ``[1, T, V]`` of ``scored``) from llama.cpp. The export's check
    caches in float32: it judges the file, not the runtime's cache precision (float16 by default: 1.7e-3
    relative logit error on the demo's f32 file, 1.5e-4 on a tiny model)."""
    llm = open_llama(path, n_ctx=max(64, scored.shape[1] + 8), f32_cache=f32_cache)
    try:
        tokens = llama_greedy(llm, ids[0].tolist(), n) if n else []
        logits = llama_logits(llm, scored[0].tolist())
    finally:
        llm.close()
    return tokens, logits[None]
