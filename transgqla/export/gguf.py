"""``--path absorb --format gguf``: one llama.cpp GGUF file of architecture ``deepseek2`` (MLA, latent cache).

llama.cpp runs DeepSeek-V2/V3's attention with the absorb trick: its KV cache holds ``r + d_R`` values per
token per layer (one MQA head), exactly GQLA's absorb cache. What the file holds (``n_h`` heads, ``r`` rank,
tensors as torch shapes; GGUF stores the reversed ``ne`` order):

=====================================  ======================================  ==============================
GGUF tensor                            from OUT                                shape
=====================================  ======================================  ==============================
``token_embd`` / ``output_norm``       ``embed_tokens`` / ``model.norm``       ``[V, D]`` / ``[D]``
``output``                             ``lm_head`` (absent when tied)          ``[V, D]``
``blk.l.attn_norm`` / ``ffn_norm``     ``input_`` / ``post_attention_layernorm``  ``[D]``
``blk.l.attn_q``                       ``q_proj``                              ``[n_h (d_nope + d_R), D]``
``blk.l.attn_kv_a_mqa``                ``[alpha W_DKV ; W_KR]``                ``[r + d_R, D]``
``blk.l.attn_kv_a_norm``               ``sqrt(eps) / alpha`` (every entry)     ``[r]``
``blk.l.attn_k_b``                     ``W_UK_{g(h)}^T`` for each head ``h``     ``[n_h, r, d_nope]``
``blk.l.attn_v_b``                     ``W_UV_{g(h)}`` for each head ``h``       ``[n_h, d_v, r]``
``blk.l.attn_output``                  ``o_proj``                              ``[D, n_h d_v]``
``blk.l.ffn_gate`` / ``_up`` / ``_down``  ``mlp.*_proj``                       as in OUT
=====================================  ======================================  ==============================

The layouts already agree with llama.cpp's: per head ``d_nope`` nope rows then ``d_R`` RoPE rows, the
latent rows before the RoPE-key rows, RoPE as adjacent pairs (llama.cpp's NORM rope = GQLA's interleaved
pairs) at ``freq_base^(-2p/d_R)``, softmax scale ``1/sqrt(key_length_mla)``. llama.cpp indexes ``k_b`` /
``v_b`` per head, so group ``g``'s blocks are written once per head of the group.

**The latent norm.** llama.cpp always applies ``attn_kv_a_norm`` and, unlike transformers, with the global
``rms_norm_eps`` (one eps for every norm). So the linear regime of :mod:`.latent_norm` works here with the
*source's* eps: ``alpha`` is chosen for it and no other norm moves (the DeepSeek engine form has to change
every norm's eps to 1e-6). The norm weight is stored in float32 (llama.cpp keeps 1-D tensors in F32), so
``|scale - 1|`` is float32 rounding.

**Types** (``--outtype``): ``f32``, ``f16``, ``bf16``, ``q8_0`` (the ``gguf`` package's quantizer) or
``auto`` (the checkpoint's dtype). 1-D tensors are F32 always. ``attn_kv_a_mqa`` stays F32 under ``f16``
and ``q8_0``: its latent rows are scaled by ``alpha`` (about 2^-20) and would underflow float16 (and
Q8_0's float16 block scales). Under ``q8_0``, ``attn_k_b`` / ``attn_v_b`` are F16 (small: one block per head;
and the most sensitive per byte: on the demo, Q8_0 on ``v_b`` alone moved the logits by 5.0e-2, on every MLP
weight together by 4.1e-2) and so is a tensor whose rows are not a multiple of 32.

**Metadata traps** (from llama.cpp's loader): ``attention.q_lora_rank`` is read unless the model has 26/27
layers (written 0: a plain ``q_proj``); every layer is a dense lead block (``leading_dense_block_count =
n_layers``) and no expert count is written (the loader's ``n_expert_groups < n_expert`` assertion only
applies with experts), but ``expert_feed_forward_length`` and ``expert_shared_count`` are required keys.

**Refused** (one line): nonzero attention biases (llama.cpp's deepseek2 has no bias slots), a RoPE scaling
(its deepseek2 applies YaRN's attention factor to any scaled RoPE, so Llama-3/linear scaling would not be
reproduced), an activation other than SiLU (its dense FFN is SiLU-gated), a source family that is not
Llama-like, and the GQA path (``--path gqa``: llama.cpp's deepseek2 always decodes through the latent).

Written tensor by tensor through ``gguf.GGUFWriter``'s header / tensor-info / data stages: one tensor (and
one layer's latent-norm bound) in memory at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UnsupportedError
from ..mathx.rope import rope_settings
from .deepseek import nonzero_biases
from .latent_norm import LinearNorm, latent_bound, linear_norm
from .source import GQLACheckpoint

ARCH = "deepseek2"
OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
AUTO_OUTTYPE = {"F32": "f32", "F64": "f32", "BF16": "bf16", "F16": "f16"}
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")  # q/k/v/o + gated SiLU MLP + RMSNorm
_CARRIED = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.(weight|bias))$"
)
_LAYER = {  # GGUF name in block l -> OUT name in layer l (copied tensors)
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, torch-order shape, storage type name and how to compute it (float32/64)."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "F32" | "F16" | "BF16" | "Q8_0"
    make: Callable[[], torch.Tensor]


def check_supported(src: GQLACheckpoint) -> list[str]:
    """Refuse (one-line UnsupportedError) what a llama.cpp deepseek2 GGUF cannot carry; return warnings."""
    geo, cfg = src.geo, src.config
    arch = ((cfg.get("gqla") or {}).get("source") or {}).get("architecture")
    if arch not in LLAMA_LIKE:
        raise UnsupportedError(f"the GGUF export carries Llama-like sources ({', '.join(LLAMA_LIKE)}); OUT comes from "
                               f"{arch or 'an unrecorded architecture'}: export --format gqla instead")
    biases = nonzero_biases(src)
    if biases:
        raise UnsupportedError(f"attention biases ({', '.join(biases)}) have no slot in llama.cpp's deepseek2; export "
                               "--path gqa --format mimo or --format gqla instead")
    _, scaling = rope_settings(cfg)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise UnsupportedError(f"rope scaling '{kind}' has no llama.cpp deepseek2 equivalent (it scales attention "
                               "for YaRN on any scaled RoPE); export --format deepseek or gqla instead")
    if geo.hidden_act != "silu":
        raise UnsupportedError(f"activation {geo.hidden_act!r}: llama.cpp's deepseek2 dense FFN is SiLU-gated; "
                               "export --format gqla instead")
    for name in src.ckpt.names:
        if not _CARRIED.match(name):
            raise UnsupportedError(f"tensor {name} has no place in a llama.cpp deepseek2 GGUF; "
                                   "export --format gqla instead")
    warnings = []
    window = geo.sliding_window
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    if window is not None and (not max_pos or window < max_pos):
        warnings.append(f"sliding_window {window} has no deepseek2 equivalent: llama.cpp attends to the full context "
                        f"(identical to the GQLA model only up to {window} tokens)")
    return warnings


def resolve_outtype(outtype: str, dtype: str) -> str:
    return AUTO_OUTTYPE.get(dtype, "f32") if outtype == "auto" else outtype


def storage_kind(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The GGUF type of one tensor under ``outtype`` (rules in the module docstring)."""
    if len(shape) == 1 or outtype == "f32":
        return "F32"
    if gguf_name.endswith("attn_kv_a_mqa.weight") and outtype in ("f16", "q8_0"):
        return "F32"
    if outtype == "q8_0":
        if gguf_name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            return "F16"  # the most sensitive per byte and small (see the module docstring)
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    return {"f16": "F16", "bf16": "BF16"}[outtype]


def latent_norms(src: GQLACheckpoint) -> list[LinearNorm]:
    """Per layer: ``alpha`` for the source's eps (the one llama.cpp uses for every norm), weight in float32."""
    return [linear_norm(latent_bound(src, l), src.geo.rank, "F32", eps=src.geo.eps) for l in range(src.geo.n_layers)]


def _attention_tensors(src: GQLACheckpoint, layer: int, norm: LinearNorm) -> dict[str, Callable[[], torch.Tensor]]:
    geo = src.geo
    m = geo.heads_per_group

    def kv_a() -> torch.Tensor:
        a = src.read64(src.attn(layer, "kv_a_proj_with_mqa.weight"))
        return torch.cat((a[: geo.rank] * norm.alpha, a[geo.rank :]))  # alpha = 2^k: exact

    def kv_b() -> torch.Tensor:  # [n_g, d_nope + d_v, r]
        return src.read64(src.attn(layer, "kv_b_proj.weight")).view(geo.n_groups, geo.d_nope + geo.d_v, geo.rank)

    return {
        "attn_kv_a_mqa.weight": kv_a,
        "attn_kv_a_norm.weight": lambda: torch.full((geo.rank,), norm.weight, dtype=torch.float64),
        "attn_k_b.weight": lambda: kv_b()[:, : geo.d_nope].transpose(1, 2).repeat_interleave(m, dim=0),
        "attn_v_b.weight": lambda: kv_b()[:, geo.d_nope :].repeat_interleave(m, dim=0),
    }


def plan_tensors(src: GQLACheckpoint, outtype: str, norms: list[LinearNorm]) -> list[PlannedTensor]:
    """Every GGUF tensor in write order, computed lazily (nothing is read here but shapes)."""
    geo = src.geo
    read = lambda name: (lambda: src.read64(name))  # noqa: E731
    shape = lambda name: tuple(src.ckpt.spec(name).shape)  # noqa: E731
    entries: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]] = [
        ("token_embd.weight", shape("model.embed_tokens.weight"), read("model.embed_tokens.weight")),
        ("output_norm.weight", shape("model.norm.weight"), read("model.norm.weight")),
    ]
    if "lm_head.weight" in src.ckpt:  # tied: llama.cpp reads token_embd as the output head
        entries.append(("output.weight", shape("lm_head.weight"), read("lm_head.weight")))
    computed_shapes = {
        "attn_kv_a_mqa.weight": (geo.rank + geo.d_rope, geo.hidden), "attn_kv_a_norm.weight": (geo.rank,),
        "attn_k_b.weight": (geo.n_heads, geo.rank, geo.d_nope), "attn_v_b.weight": (geo.n_heads, geo.d_v, geo.rank),
    }
    for l in range(geo.n_layers):
        blk = f"blk.{l}."
        for g_name, rel in _LAYER.items():
            name = f"model.layers.{l}.{rel}"
            entries.append((blk + g_name, shape(name), read(name)))
        for g_name, make in _attention_tensors(src, l, norms[l]).items():
            entries.append((blk + g_name, computed_shapes[g_name], make))
    return [PlannedTensor(n, s, storage_kind(n, s, outtype), f) for n, s, f in entries]


def _encode(t: torch.Tensor, kind: str) -> np.ndarray:
    """The bytes of ``t`` as the GGUF type ``kind`` (a numpy array ``GGUFWriter.write_tensor_data`` takes)."""
    if kind == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if kind == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if kind == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    import gguf

    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)


def _tensor_info(writer: Any, p: PlannedTensor) -> int:
    """Announce one tensor to the writer; returns its byte size."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, p.kind)
    if p.kind == "Q8_0":
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, qtype)
        nbytes = math.prod(byte_shape)
        writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        return nbytes
    width = {"F32": 4, "F16": 2, "BF16": 2}[p.kind]
    nbytes = math.prod(p.shape) * width
    writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.kind == "F32" else np.float16), nbytes,
                           raw_dtype=qtype)
    return nbytes


def _metadata(writer: Any, src: GQLACheckpoint, outtype: str, name: str) -> None:
    import gguf

    geo, cfg = src.geo, src.config
    base, _ = rope_settings(cfg)
    inter = int(cfg["intermediate_size"])
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(geo.hidden)
    writer.add_block_count(geo.n_layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(geo.n_heads)
    writer.add_head_count_kv(1)  # MLA decodes as MQA over the latent
    writer.add_rope_freq_base(base)
    writer.add_rope_dimension_count(geo.d_rope)
    writer.add_layer_norm_rms_eps(geo.eps)
    writer.add_leading_dense_block_count(geo.n_layers)
    writer.add_q_lora_rank(0)
    writer.add_kv_lora_rank(geo.rank)
    writer.add_key_length(geo.rank + geo.d_rope)  # the cached key: latent + RoPE key
    writer.add_value_length(geo.rank)
    writer.add_key_length_mla(geo.d_nope + geo.d_rope)
    writer.add_value_length_mla(geo.d_v)
    writer.add_expert_feed_forward_length(inter)
    writer.add_expert_shared_count(0)


def write_gguf(src: GQLACheckpoint, path: Path, outtype: str, vocab: Any, name: str) -> dict[str, Any]:
    """Write ``path`` (one GGUF file); returns the details for the export's result."""
    import gguf

    from .gguf_vocab import write_vocab

    norms = latent_norms(src)
    plan = plan_tensors(src, outtype, norms)
    writer = gguf.GGUFWriter(path, ARCH)
    try:
        _metadata(writer, src, outtype, name)
        write_vocab(writer, vocab, int(src.config["vocab_size"]))
        total = sum(_tensor_info(writer, p) for p in plan)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            writer.write_tensor_data(_encode(p.make(), p.kind))
    finally:
        writer.close()
    kinds: dict[str, int] = {}
    for p in plan:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return {
        "outtype": outtype, "tensors_written": len(plan), "bytes_written": total, "tensor_types": kinds,
        "tensors_byte_identical": False, "cache_values_per_token": src.geo.rank + src.geo.d_rope,
        "latent_norm": {"form": "linear (source eps)", "eps": src.geo.eps,
                        "worst_case_rel_error": max(n.worst_rel_error for n in norms),
                        "max_residual_scale_error": max(abs(n.scale - 1) for n in norms), "residual_folded_layers": 0},
        "vocab": vocab.summary(),
    }


