"""``--path gqa --format mimo``: the GQA path as a stock MiMo-V2-Flash checkpoint (no remote code).

transformers (``MiMoV2FlashForCausalLM``, ``model_type: "mimo_v2_flash"``), vLLM and SGLang implement MiMo-V2's
attention: ``n_g`` KV heads with keys of ``head_dim`` and values of ``v_head_dim``, partial rotary on the
*first* ``head_dim * partial_rotary_factor`` dims in NeoX halves, q/k/v biases, softmax scale
``head_dim^-0.5`` and values multiplied by ``attention_value_scale``. With every layer ``full_attention``
and ``dense`` it carries GQLA's GQA path exactly: ``q . k`` is unchanged by a permutation applied to both q
and k dims, and the shared RoPE key is copied into every group. Per layer (``r`` GQLA rank, shapes
``[out, in]``)::

    q_proj  [n_h (d_R + d_nope), D]  per head: its d_R RoPE rows reordered from interleaved pairs (2p, 2p+1)
                                     to NeoX halves (p, p + d_R/2), then its d_nope nope rows (+ bias, same order)
    k_proj  [n_g (d_R + d_nope), D]  per group g: W_KR (the shared RoPE-key rows, same reordering), then
                                     W_UK_g W_DKV;  bias [b_KR ; W_UK_g b_DKV + b_UK_g]
    v_proj  [n_g d_v, D]             per group g: W_UV_g W_DKV;  bias W_UV_g b_DKV + b_UV_g
    o_proj  [D, n_h d_v]             unchanged (MiMo's o_proj has no bias: a nonzero one is refused)

Products are computed in float64 and rounded once to the checkpoint dtype. Config: ``head_dim = d_nope +
d_R`` (so the stock scale is GQLA's ``1/sqrt(d_nope + d_R)``), ``partial_rotary_factor = d_R / head_dim``
(rotary pair ``p`` at ``rope_theta^(-2p/d_R)``, the DeepSeek geometry GQLA keeps), ``attention_value_scale:
1.0`` (transformers defaults to 0.707 when absent), the source's ``rms_norm_eps``. Both config spellings are
written: transformers' (``layer_types``, ``mlp_layer_types``, ``rope_parameters`` keyed by layer type) and
the hub's that vLLM reads (``hybrid_layer_pattern``, ``moe_layer_freq``, ``rope_theta``,
``partial_rotary_factor``, ``layernorm_epsilon``; no legacy ``rope_scaling``, which transformers' MiMo config
rejects next to layer-typed ``rope_parameters`` and vLLM's MiMo ignores). KV cache: ``n_g (d_nope + d_R + d_v)`` values per token
per layer.

``--equal-kv`` writes V zero-padded to the key's head size (``v_head_dim = head_dim = d_nope + d_R``): per group
``d_nope + d_R - d_v`` zero rows after ``v_proj``'s ``d_v`` rows, and in ``o_proj`` the same number of zero
columns after each head's ``d_v`` columns. The padded value dims are zero in every token, so the attention
output's extra dims are zero and ``o_proj`` ignores them: exact (no value is re-rounded beyond the unpadded
form). Engines then take their ordinary attention (equal K/V head sizes; vLLM's diff-KV backend is Triton-only
and fails on CPU), at a cache of ``2 n_g (d_nope + d_R)`` values per token per layer instead of ``n_g (d_nope +
d_R + d_v)``. What the carrier cannot express is said in the warnings: a sliding window (MiMo's sliding
layers add attention sinks and double the KV heads; the export attends to the full context) and, in vLLM
only, RoPE scaling (its MiMo attention applies plain RoPE).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedError
from ..io.safetensors_format import to_torch_dtype
from ..mathx.rope import interleaved_to_half, inv_freq, rope_settings
from .deepseek import rope_fields, stock_common
from .gqla_paths import export_info, finish, fold_layer
from .source import GQLACheckpoint, plan_rewritten, write_planned

_PASS_THROUGH = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.self_attn\.o_proj\.weight)$"
)
_O_PROJ = re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj\.weight$")
_REPLACED = re.compile(r"^model\.layers\.\d+\.self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj)\.(weight|bias)$")
ANGLE_TOLERANCE = 0.1  # rad: a RoPE angle off by this much is a different position


def rope_first(w: torch.Tensor, n: int, d_nope: int, d_rope: int) -> torch.Tensor:
    """Rows ``[n (d_nope + d_R), ...]`` (per head: nope, then interleaved RoPE) -> ``[n (d_R + d_nope), ...]``
    (per head: RoPE in NeoX halves, then nope). Works for weights ``[rows, D]`` and biases ``[rows]``."""
    blocks = w.reshape(n, d_nope + d_rope, *w.shape[1:])
    rope = interleaved_to_half(blocks[:, d_nope:], dim=1)
    return torch.cat((rope, blocks[:, :d_nope]), dim=1).reshape(w.shape)


def value_head_dim(src: GQLACheckpoint, equal_kv: bool) -> int:
    """The exported ``v_head_dim``: GQLA's ``d_v``, or the key's ``d_nope + d_R`` with ``--equal-kv``."""
    return src.geo.d_nope + src.geo.d_rope if equal_kv else src.geo.d_v


def pad_values(v: torch.Tensor, n: int, d_v: int, d_out: int) -> torch.Tensor:
    """Rows ``[n d_v, ...]`` -> ``[n d_out, ...]``: per head, its ``d_v`` rows then ``d_out - d_v`` zero rows."""
    blocks = v.reshape(n, d_v, *v.shape[1:])
    zeros = blocks.new_zeros(n, d_out - d_v, *v.shape[1:])
    return torch.cat((blocks, zeros), dim=1).reshape(n * d_out, *v.shape[1:])


def padded_o_proj(src: GQLACheckpoint, layer: int, d_out: int) -> torch.Tensor:
    """``o_proj`` ``[D, n_h d_v]`` -> ``[D, n_h d_out]`` with zero columns after each head's (bytes kept)."""
    w = src.ckpt.read(src.attn(layer, "o_proj.weight"))
    return pad_values(w.T.contiguous(), src.geo.n_heads, src.geo.d_v, d_out).T.contiguous()


def mimo_layer(src: GQLACheckpoint, layer: int, with_bias: bool, equal_kv: bool = False) -> dict[str, torch.Tensor]:
    """q/k/v projections of one layer in float64 (names relative to ``self_attn.``); with ``equal_kv`` the
    values zero-padded to the key's head size (and ``o_proj``, in the checkpoint dtype, padded to match)."""
    out = _qkv(src, layer, with_bias)
    if equal_kv:
        geo, d_out = src.geo, value_head_dim(src, True)
        out["v_proj.weight"] = pad_values(out["v_proj.weight"], geo.n_groups, geo.d_v, d_out)
        if "v_proj.bias" in out:
            out["v_proj.bias"] = pad_values(out["v_proj.bias"], geo.n_groups, geo.d_v, d_out)
        out["o_proj.weight"] = padded_o_proj(src, layer, d_out)
    return out


def _qkv(src: GQLACheckpoint, layer: int, with_bias: bool) -> dict[str, torch.Tensor]:
    geo = src.geo
    folded = fold_layer(src, layer)  # k: per group [W_UK_g W_DKV ; W_KR], v: per group W_UV_g W_DKV
    out = {
        "q_proj.weight": rope_first(src.read64(src.attn(layer, "q_proj.weight")), geo.n_heads, geo.d_nope, geo.d_rope),
        "k_proj.weight": rope_first(folded["k_proj.weight"], geo.n_groups, geo.d_nope, geo.d_rope),
        "v_proj.weight": folded["v_proj.weight"],
    }
    if with_bias:
        q_bias = src.read64(src.attn(layer, "q_proj.bias"))
        dq = geo.d_nope + geo.d_rope
        out["q_proj.bias"] = (torch.zeros(geo.n_heads * dq, dtype=torch.float64) if q_bias is None
                              else rope_first(q_bias, geo.n_heads, geo.d_nope, geo.d_rope))
        k_bias = folded.get("k_proj.bias")
        out["k_proj.bias"] = (torch.zeros(geo.n_groups * dq, dtype=torch.float64) if k_bias is None
                              else rope_first(k_bias, geo.n_groups, geo.d_nope, geo.d_rope))
        out["v_proj.bias"] = folded.get("v_proj.bias", torch.zeros(geo.n_groups * geo.d_v, dtype=torch.float64))
    return out


def _has_bias(src: GQLACheckpoint) -> bool:
    rels = ("q_proj.bias", "kv_a_proj_with_mqa.bias", "kv_b_proj.bias")
    return any(src.attn(l, rel) in src.ckpt for l in range(src.geo.n_layers) for rel in rels)


def rope_scaling_consequence(cfg: dict[str, Any], d_rope: int) -> str | None:
    """What plain RoPE (vLLM's MiMo attention) changes for this RoPE key, or None when nothing."""
    base, scaling = rope_settings(cfg)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "dynamic":
        return None
    scaled, plain = inv_freq(d_rope, base, scaling), inv_freq(d_rope, base)
    gap = (plain - scaled).abs()
    moved = int((gap > 1e-12 * plain).sum())
    if not moved:
        return None
    first = ANGLE_TOLERANCE / float(gap.max())
    return (f"vLLM's mimo_v2_flash applies plain RoPE: {moved} of {d_rope // 2} RoPE pairs would rotate up to "
            f"{float((plain / scaled).max()):.3g}x faster than this model's {scaling.get('rope_type', scaling.get('type'))} "
            f"scaling, their angles off by more than {ANGLE_TOLERANCE} rad from position {math.ceil(first)} "
            f"(transformers applies the scaling)")


def check_supported(src: GQLACheckpoint) -> list[str]:
    """Refuse what MiMo-V2-Flash's attention cannot express (one-line UnsupportedError); return warnings."""
    geo, cfg = src.geo, src.config
    beyond = geo.block.beyond_llama()
    if beyond:
        raise UnsupportedError(f"the {geo.block.family} block has {beyond[0]}, which a dense MiMo-V2-Flash checkpoint "
                               "cannot express; export --format gqla instead")
    for name in src.ckpt.names:
        if name.endswith("self_attn.o_proj.bias"):
            if bool(src.ckpt.read(name).any()):
                raise UnsupportedError("MiMo-V2-Flash's o_proj has no bias; export --format gqla instead")
            continue
        if not (_PASS_THROUGH.match(name) or _REPLACED.match(name)):
            raise UnsupportedError(f"tensor {name} has no place in a MiMo-V2-Flash checkpoint; export --format gqla instead")
    from transformers.activations import ACT2FN

    if geo.hidden_act not in ACT2FN:
        raise UnsupportedError(f"activation {geo.hidden_act!r} is not available to MiMo-V2-Flash in transformers")
    warnings = []
    if geo.hidden_act != "silu":
        warnings.append(f"vLLM's mimo_v2_flash accepts only silu MLPs, this model uses {geo.hidden_act} (transformers runs it)")
    window = geo.sliding_window
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    if window is not None and (not max_pos or window < max_pos):
        warnings.append(f"sliding_window {window} has no MiMo-V2-Flash equivalent without attention sinks: the export "
                        f"attends to the full context (identical to the GQLA model only up to {window} tokens)")
    rope = rope_scaling_consequence(cfg, geo.d_rope)
    if rope:
        warnings.append(rope)
    if geo.tie_embeddings or "lm_head.weight" not in src.ckpt:
        warnings.append("tied embeddings written untied (lm_head.weight is a copy of model.embed_tokens.weight)")
    return warnings


def rotary_factor(head_dim: int, d_rope: int) -> float:
    """``partial_rotary_factor`` whose ``int(head_dim * factor)`` (how every runtime reads it) is ``d_rope``."""
    exact = d_rope / head_dim
    return exact if int(head_dim * exact) == d_rope else (d_rope + 0.5) / head_dim


def mimo_config(src: GQLACheckpoint, info: dict[str, Any], with_bias: bool, equal_kv: bool = False) -> dict[str, Any]:
    geo, cfg = src.geo, src.config
    head_dim = geo.d_nope + geo.d_rope
    factor = rotary_factor(head_dim, geo.d_rope)
    rope = rope_fields(cfg)
    L = geo.n_layers
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": geo.hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": L,
        "num_attention_heads": geo.n_heads,
        "num_key_value_heads": geo.n_groups,
        "head_dim": head_dim,
        "v_head_dim": value_head_dim(src, equal_kv),
        "attention_value_scale": 1.0,
        "attention_bias": with_bias,
        "attention_dropout": 0.0,
        "layer_types": ["full_attention"] * L,
        "mlp_layer_types": ["dense"] * L,
        "hybrid_layer_pattern": [0] * L,  # the hub spelling vLLM reads: 0 = full attention
        "moe_layer_freq": [0] * L,  # 0 = dense MLP
        "rope_parameters": {"full_attention": {**rope["rope_parameters"], "partial_rotary_factor": factor}},
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": factor,
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 4096),
        "hidden_act": geo.hidden_act,
        "rms_norm_eps": geo.eps,
        "layernorm_epsilon": geo.eps,
        "n_routed_experts": 2,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": int(cfg["intermediate_size"]),
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        **stock_common(src),
        "transgqla": {**info, "gqla": {k: cfg["gqla"].get(k) for k in ("format_version", "source", "conversion")}},
    }


def mimo_cache_values(src: GQLACheckpoint, equal_kv: bool) -> int:
    """KV-cache values per token per layer: ``n_g (d_nope + d_R + d_v)``, or ``2 n_g (d_nope + d_R)`` padded."""
    geo = src.geo
    return geo.n_groups * (geo.d_nope + geo.d_rope + value_head_dim(src, equal_kv))


def write_mimo(src: GQLACheckpoint, folder: Path, max_shard_bytes: int, warnings: list[str],
               equal_kv: bool = False) -> dict[str, Any]:
    geo, dtype = src.geo, src.dtype
    tdt = to_torch_dtype(dtype)
    with_bias = _has_bias(src)
    dq, dv = geo.d_nope + geo.d_rope, value_head_dim(src, equal_kv)
    shapes = {"q_proj.weight": (geo.n_heads * dq, geo.hidden), "k_proj.weight": (geo.n_groups * dq, geo.hidden),
              "v_proj.weight": (geo.n_groups * dv, geo.hidden)}
    if with_bias:
        shapes.update({"q_proj.bias": (geo.n_heads * dq,), "k_proj.bias": (geo.n_groups * dq,),
                       "v_proj.bias": (geo.n_groups * dv,)})
    if equal_kv:
        shapes["o_proj.weight"] = (geo.hidden, geo.n_heads * dv)
    keep = (lambda n: bool(_PASS_THROUGH.match(n)) and not (equal_kv and _O_PROJ.match(n)))  # noqa: E731
    specs, computed, aliases = plan_rewritten(src, keep, shapes, dtype)

    def compute(layer: int) -> dict[str, torch.Tensor]:
        tensors = mimo_layer(src, layer, with_bias, equal_kv)
        return {src.attn(layer, k): v.to(tdt).contiguous() for k, v in tensors.items()}

    files = write_planned(src, folder, specs, computed, compute, max_shard_bytes, aliases=aliases)
    cache = mimo_cache_values(src, equal_kv)
    info = export_info(src, format="mimo", path="gqa", folded=True, warnings=warnings, cache_values_per_token=cache,
                       head_dim=dq, v_head_dim=dv, equal_kv=equal_kv,
                       partial_rotary_factor=rotary_factor(dq, geo.d_rope))
    finish(src, folder, mimo_config(src, info, with_bias, equal_kv), files, remote_code=False,
           export_info={k: v for k, v in info.items() if k != "warnings"})
    return {"tensors_written": len(specs), "bytes_written": sum(s.nbytes for s in specs),
            "tensors_byte_identical": False, "cache_values_per_token": cache, "equal_kv": equal_kv,
            "cache_values_per_token_unpadded": mimo_cache_values(src, False),
            "source_cache_values_per_token": (src.config["gqla"].get("cache_values_per_token") or {}).get("source_gqa")}
