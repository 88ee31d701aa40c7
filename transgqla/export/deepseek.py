"""``--path absorb --format deepseek``: a stock DeepSeek-V3 checkpoint (dense, no remote code).

Loaded as ``model_type: "deepseek_v3"`` with ``first_k_dense_replace = num_hidden_layers`` (every MLP dense;
the expert fields hold small valid values that build nothing: ``n_routed_experts: 2`` because llama.cpp
asserts ``n_expert_groups < n_expert``), ``q_lora_rank: null``, ``rope_interleave: true``, ``head_dim =
qk_rope_head_dim``, ``num_key_value_heads = num_attention_heads`` (``kv_b_proj`` holds one block per head),
RoPE in both spellings (``rope_theta`` + ``rope_scaling`` for transformers 4 and the engines,
``rope_parameters`` for transformers 5) and ``torch_dtype`` + ``dtype``. Two targets:

* ``engines`` (default): what stock vLLM and SGLang run, and transformers too: no biases, ``kv_lora_rank =
  r``, the latent norm in its linear regime and ``rms_norm_eps: 1e-6`` (:func:`.latent_norm.linear_norm`);
  for float32 weights the other norms keep the source's eps exactly through a residual-stream scale
  (:func:`stream_scale`), for half precision they run at 1e-6 (measured in the check).
  Attention biases (Qwen2) have no slot in the engines' DeepSeek attention: refused with one line naming
  the alternatives; float16 checkpoints too (the scaled latent rows would be subnormal). The result says
  which MLA kernels accept the shape (:mod:`transgqla.engines`).
* ``transformers``: exact to float32 rounding in stock transformers only: the constant-coordinate pin
  (``kv_lora_rank = r + 1``, biases), the source's ``rms_norm_eps``; query biases through
  ``q_lora_rank = D + 1`` on request (:func:`.deepseek_layers.query_lora`).

Tensor layouts: :mod:`.deepseek_layers`. Tied embeddings are written untied (``lm_head.weight`` = a copy of
the embedding). A source ``sliding_window`` smaller than ``max_position_embeddings`` (Mistral) has no
DeepSeek-V3 equivalent: the export attends to the full context, and says so in its warnings.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..engines import MLAShape, advice, decode_support, fast_kernels, vllm_prefill_ok
from ..errors import UnsupportedError
from ..io.safetensors_format import to_torch_dtype
from ..mathx.rope import rope_settings
from .deepseek_layers import engines_layer, pinned_layer, query_lora
from .gqla_paths import export_info, finish
from .latent_norm import (
    LATENT_NORM_EPS,
    embedding_mean_square,
    eps_shift,
    input_bound,
    latent_bound,
    linear_norm,
    pin_norm,
    rescale_pays,
)
from .source import GQLACheckpoint, plan_rewritten, write_planned

TARGETS = ("engines", "transformers")
_PASS_THROUGH = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.self_attn\.(q_proj|o_proj)\.weight)$"
)
_REPLACED = re.compile(r"^model\.layers\.\d+\.self_attn\.(kv_a_proj_with_mqa\.(weight|bias)|kv_b_proj\.(weight|bias)|o_proj\.bias)$")
_BIASES = ("q_proj.bias", "kv_a_proj_with_mqa.bias", "kv_b_proj.bias", "o_proj.bias")
QUERY_BIAS_MESSAGE = ("{arch} query bias has no slot in DeepSeek-V3's q_proj; export --format gqla instead "
                      "(or pass --q-lora-bias to carry it through a q_lora_rank = hidden_size + 1 factorization)")
ENGINE_BIAS_MESSAGE = ("{arch} attention biases ({names}) have no slot in vLLM/SGLang's DeepSeek attention; export "
                       "--path gqa --format mimo (carries q/k/v biases, stock in transformers, vLLM, SGLang) or "
                       "--format deepseek --target transformers (exact, stock transformers only)")
DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stock_common(src: GQLACheckpoint) -> dict[str, Any]:
    """Config fields every stock-class export writes alike: untied head (written out), token ids, dtype."""
    cfg = src.config
    return {"tie_word_embeddings": False, "use_cache": True, "bos_token_id": cfg.get("bos_token_id"),
            "eos_token_id": cfg.get("eos_token_id"), "pad_token_id": cfg.get("pad_token_id"),
            "dtype": DTYPE_NAMES[src.dtype], "torch_dtype": DTYPE_NAMES[src.dtype]}


def _source_arch(src: GQLACheckpoint) -> str:
    arch = ((src.config.get("gqla") or {}).get("source") or {}).get("architecture") or "the source's"
    return {"Qwen2ForCausalLM": "Qwen2"}.get(arch, arch)


def nonzero_biases(src: GQLACheckpoint) -> list[str]:
    """Attention bias kinds (names relative to ``self_attn.``) that hold a nonzero value in some layer."""
    found = []
    for rel in _BIASES:
        names = [src.attn(l, rel) for l in range(src.geo.n_layers)]
        if any(n in src.ckpt and bool(src.ckpt.read(n).any()) for n in names):
            found.append(rel)
    return found


def has_query_bias(src: GQLACheckpoint) -> bool:
    return "q_proj.bias" in nonzero_biases(src)


def check_supported(src: GQLACheckpoint, target: str = "engines", query_bias_lora: bool = False) -> list[str]:
    """Refuse what the target cannot express (one-line UnsupportedError); return warnings."""
    geo, cfg = src.geo, src.config
    warnings: list[str] = []
    beyond = geo.block.beyond_llama()
    if beyond:
        raise UnsupportedError(f"the {geo.block.family} block has {beyond[0]}, which a DeepSeek-V3 checkpoint cannot "
                               "express; export --format gqla instead")
    biases = nonzero_biases(src)
    if target == "engines":
        if biases:
            raise UnsupportedError(ENGINE_BIAS_MESSAGE.format(arch=_source_arch(src), names=", ".join(biases)))
        if src.dtype == "F16":
            raise UnsupportedError("float16 cannot hold the engine form's scaled latent rows (subnormal); convert with "
                                   "--dtype bfloat16 or float32, or export --target transformers")
        if abs(geo.eps - LATENT_NORM_EPS) > 1e-12:
            dtypes, m = _stream_dtypes(src), embedding_mean_square(src)
            if stream_scale(geo.eps, dtypes, m) != 1.0 and dtypes <= {"F32", "F64"}:
                warnings.append(f"rms_norm_eps {geo.eps:g} -> {LATENT_NORM_EPS:g} (the latent norm's eps in every runtime), "
                                f"compensated exactly by scaling the residual stream by sqrt({LATENT_NORM_EPS:g}/{geo.eps:g})")
            elif stream_scale(geo.eps, dtypes, m) != 1.0:
                warnings.append(f"rms_norm_eps {geo.eps:g} -> {LATENT_NORM_EPS:g} (the latent norm's eps in every runtime), "
                                f"compensated by scaling the residual stream by sqrt({LATENT_NORM_EPS:g}/{geo.eps:g}), re-rounded "
                                f"to half precision: the eps change alone would move the first norm by {eps_shift(geo.eps, m):.1e} "
                                f"(embedding mean square {m:.1e}), more than the rounding; the check's logit error includes it")
            else:
                warnings.append(f"rms_norm_eps {geo.eps:g} -> {LATENT_NORM_EPS:g} in every norm (every runtime must give the "
                                f"latent norm the eps transformers hard-codes); the check's logit error includes it")
    elif "q_proj.bias" in biases:
        if not query_bias_lora:
            raise UnsupportedError(QUERY_BIAS_MESSAGE.format(arch=_source_arch(src)))
        warnings.append(f"query bias carried through q_lora_rank = {geo.hidden + 1} (identity q_a_proj, pinned q_a_layernorm)")
    for name in src.ckpt.names:
        if not (_PASS_THROUGH.match(name) or _REPLACED.match(name) or name.endswith("self_attn.q_proj.bias")):
            raise UnsupportedError(f"tensor {name} has no place in a DeepSeek-V3 checkpoint; export --format gqla instead")
    from transformers.activations import ACT2FN

    if geo.hidden_act not in ACT2FN:
        raise UnsupportedError(f"activation {geo.hidden_act!r} is not available to DeepSeek-V3 in transformers")
    window = geo.sliding_window
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    if window is not None and (not max_pos or window < max_pos):
        warnings.append(
            f"sliding_window {window} has no DeepSeek-V3 equivalent: the export attends to the full context "
            f"(identical to the GQLA model only up to {window} tokens)"
        )
    if geo.tie_embeddings or "lm_head.weight" not in src.ckpt:
        warnings.append("tied embeddings written untied (lm_head.weight is a copy of model.embed_tokens.weight)")
    if target == "engines":
        hint = advice(engine_shape(src))
        if hint:
            warnings.append(hint)
    return warnings


def engine_shape(src: GQLACheckpoint) -> MLAShape:
    g = src.geo
    return MLAShape(g.rank, g.d_rope, g.d_nope, g.d_v)


def engine_support(shape: MLAShape) -> dict[str, Any]:
    """What the serving engines make of ``shape`` (:mod:`transgqla.engines`), for results and configs."""
    return {"shape": {"kv_lora_rank": shape.rank, "qk_rope_head_dim": shape.d_rope, "qk_nope_head_dim": shape.d_nope,
                      "v_head_dim": shape.d_v},
            "fast_decode_kernels": fast_kernels(shape), "vllm_prefill_accepts": vllm_prefill_ok(shape),
            "kernels": {v.kernel: v.accepted for v in decode_support(shape)}, "advice": advice(shape)}


def rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE in both spellings: ``rope_theta`` + ``rope_scaling`` (v4, engines) and ``rope_parameters`` (v5)."""
    base, scaling = rope_settings(cfg)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    legacy = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        extra = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
        params.update(extra)
        params["rope_type"] = kind
        legacy = {"rope_type": kind, "type": kind, **extra}
    return {"rope_theta": base, "rope_scaling": legacy, "rope_parameters": params}


def deepseek_config(src: GQLACheckpoint, target: str, norms: list, info: dict[str, Any], beta: float = 1.0) -> dict[str, Any]:
    geo, cfg = src.geo, src.config
    inter = int(cfg["intermediate_size"])
    engines = target == "engines"
    how = ("linear regime: latent rows of kv_a_proj_with_mqa times alpha (a power of two), kv_a_layernorm weight "
           "sqrt(1e-6)/alpha, rms_norm_eps 1e-6; residual_scale folded into kv_b_proj when residual_folded" if engines else
           "kv_lora_rank = GQLA rank + 1; the last latent coordinate is the constant M (zero kv_a row, bias M, norm "
           "weight 0, zero kv_b column) so kv_a_layernorm scales the GQLA latent by residual_scale (folded into "
           "kv_b_proj when residual_folded)")
    extra = {"engines": engine_support(engine_shape(src))} if engines else {}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": geo.hidden,
        "intermediate_size": inter,
        "num_hidden_layers": geo.n_layers,
        "num_attention_heads": geo.n_heads,
        "num_key_value_heads": geo.n_heads,
        # dense everywhere: first_k_dense_replace = num_hidden_layers; the expert fields build nothing
        "first_k_dense_replace": geo.n_layers,
        "moe_layer_freq": 1,
        "moe_intermediate_size": inter,
        "n_routed_experts": 2,  # >= 2: llama.cpp asserts n_expert_groups (1) < n_expert
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "ep_size": 1,
        "num_nextn_predict_layers": 0,
        "q_lora_rank": None,
        "kv_lora_rank": geo.rank if engines else geo.rank + 1,
        "qk_nope_head_dim": geo.d_nope,
        "qk_rope_head_dim": geo.d_rope,
        "v_head_dim": geo.d_v,
        "head_dim": geo.d_rope,
        "rope_interleave": True,
        **rope_fields(cfg),
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 4096),
        "hidden_act": geo.hidden_act,
        "rms_norm_eps": LATENT_NORM_EPS if engines else geo.eps,
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        "attention_bias": not engines,
        "attention_dropout": 0.0,
        **stock_common(src),
        "transgqla": {
            **info,
            "target": target,
            "source_rms_norm_eps": geo.eps,
            "residual_stream_scale": beta,
            "latent_norm": {"how": how, "layers": [p.to_dict() for p in norms]},
            **extra,
            "gqla": {k: cfg["gqla"].get(k) for k in ("format_version", "source", "conversion")},
        },
    }


def _attention_shapes(src: GQLACheckpoint, target: str, use_q_lora: bool) -> dict[str, tuple[int, ...]]:
    geo = src.geo
    if target == "engines":
        r = geo.rank
        return {"kv_a_proj_with_mqa.weight": (r + geo.d_rope, geo.hidden), "kv_a_layernorm.weight": (r,),
                "kv_b_proj.weight": (geo.n_heads * (geo.d_nope + geo.d_v), r)}
    r1 = geo.rank + 1
    shapes = {
        "kv_a_proj_with_mqa.weight": (r1 + geo.d_rope, geo.hidden),
        "kv_a_proj_with_mqa.bias": (r1 + geo.d_rope,),
        "kv_a_layernorm.weight": (r1,),
        "kv_b_proj.weight": (geo.n_heads * (geo.d_nope + geo.d_v), r1),
        "o_proj.bias": (geo.hidden,),
    }
    if use_q_lora:
        dq = geo.d_nope + geo.d_rope
        shapes.update({"q_a_proj.weight": (geo.hidden + 1, geo.hidden), "q_a_proj.bias": (geo.hidden + 1,),
                       "q_a_layernorm.weight": (geo.hidden + 1,), "q_b_proj.weight": (geo.n_heads * dq, geo.hidden + 1)})
    return shapes


def _stream_dtypes(src: GQLACheckpoint) -> set[str]:
    """Storage dtypes of the tensors :func:`stream_scale` multiplies (OUT keeps the source's dtype outside attention)."""
    return {src.ckpt.spec(n).dtype for n in src.ckpt.names
            if n == "model.embed_tokens.weight" or n.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))}


def stream_scale(eps: float, dtypes: set[str], mean_square: float | None = None) -> float:
    """``beta`` that makes every ``rms_norm_eps = 1e-6`` norm act as one with the source's ``eps`` (1: none).

    RMSNorm is scale-free but for its eps: ``RMSNorm(beta h; e) = w h / sqrt(mean(h^2) + e / beta^2)``. With the
    residual stream scaled by ``beta = sqrt(1e-6 / eps)`` (the embedding and every ``o_proj`` / ``down_proj``
    times ``beta``; attention and MLP inputs are normalized, so nothing else changes; ``lm_head`` reads the
    final norm's output, unscaled) each norm sees ``eps`` again, exactly. Always done for float32/float64
    storage; for half precision only when the eps change would move the first norm by more than re-rounding
    those three matrices does (:func:`.latent_norm.rescale_pays`, with ``mean_square`` the embedding's).
    """
    if abs(eps - LATENT_NORM_EPS) <= 1e-12 or not rescale_pays(eps, dtypes, mean_square):
        return 1.0
    return math.sqrt(LATENT_NORM_EPS / eps)


def write_deepseek(src: GQLACheckpoint, folder: Path, max_shard_bytes: int, warnings: list[str],
                   target: str = "engines", query_bias_lora: bool = False) -> dict[str, Any]:
    geo, dtype = src.geo, src.dtype
    tdt = to_torch_dtype(dtype)
    engines = target == "engines"
    if engines:
        norms = [linear_norm(latent_bound(src, l), geo.rank, dtype) for l in range(geo.n_layers)]
    else:
        norms = [pin_norm(latent_bound(src, l), geo.rank + 1, dtype) for l in range(geo.n_layers)]
    use_q_lora = not engines and query_bias_lora and has_query_bias(src)
    q_pins = [pin_norm(input_bound(src, l), geo.hidden + 1, dtype) for l in range(geo.n_layers)] if use_q_lora else []
    shapes = _attention_shapes(src, target, use_q_lora)
    keep = lambda n: bool(_PASS_THROUGH.match(n)) and not (use_q_lora and n.endswith("self_attn.q_proj.weight"))  # noqa: E731
    specs, computed, aliases = plan_rewritten(src, keep, shapes, dtype)

    def compute(layer: int) -> dict[str, torch.Tensor]:
        out = engines_layer(src, layer, norms[layer]) if engines else pinned_layer(src, layer, norms[layer])
        if use_q_lora:
            out.update(query_lora(src, layer, q_pins[layer], tdt))
        return {src.attn(layer, k): v.to(tdt).contiguous() for k, v in out.items()}

    beta = stream_scale(geo.eps, _stream_dtypes(src), embedding_mean_square(src)) if engines else 1.0
    scales = {}
    if beta != 1.0:
        scales = {s.name: beta for s in specs if s.name not in computed and s.name not in aliases and
                  (s.name == "model.embed_tokens.weight" or s.name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")))}
    files = write_planned(src, folder, specs, computed, compute, max_shard_bytes, aliases=aliases, scales=scales)
    info = export_info(src, format="deepseek", path="absorb", target=target, folded=False, warnings=warnings)
    config = deepseek_config(src, target, norms, info, beta)
    if use_q_lora:
        config["q_lora_rank"] = geo.hidden + 1
        config["transgqla"]["query_norm"] = {
            "how": "q_lora_rank = hidden_size + 1 carries the query bias: q_a_proj = [I ; 0] with bias [0 ; M], "
                   "q_a_layernorm weight [w ... w, 1], q_b_proj = [W_q | b_q / u]",
            "layers": [p.to_dict() for p in q_pins],
        }
    finish(src, folder, config, files, remote_code=False, export_info={k: v for k, v in info.items() if k != "warnings"})
    everything = norms + q_pins
    details: dict[str, Any] = {
        "target": target,
        "tensors_written": len(specs), "bytes_written": sum(s.nbytes for s in specs), "tensors_byte_identical": False,
        "cache_values_per_token": geo.rank + geo.d_rope + (0 if engines else 1),
        "latent_norm": {"form": "linear" if engines else "constant coordinate",
                        "worst_case_rel_error": max(p.worst_rel_error for p in everything),
                        "max_residual_scale_error": max(abs(p.scale - 1) for p in everything),
                        "residual_folded_layers": sum(p.folded for p in everything), "query_lora": use_q_lora},
    }
    if engines:
        details["engines"] = engine_support(engine_shape(src))
        details["residual_stream_scale"] = beta
    return details
