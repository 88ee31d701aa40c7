"""``--path absorb --format deepseek``: a stock DeepSeek-V3 checkpoint (dense, no remote code).

Stock transformers (``DeepseekV3ForCausalLM``), and in principle vLLM and SGLang, load it as
``model_type: "deepseek_v3"`` with ``first_k_dense_replace = num_hidden_layers`` (every MLP dense; the
expert fields hold small valid values that build nothing), ``q_lora_rank: null``, ``rope_interleave:
true``, ``head_dim = qk_rope_head_dim`` and ``num_key_value_heads = num_attention_heads``. What changes
from the GQLA checkpoint, per layer:

* ``kv_b_proj`` is replicated per head: head ``h`` gets group ``h // (n_h / n_g)``'s block (MLA indexes
  the up-projections per head), bytes copied.
* **The latent RMSNorm.** DeepSeek normalizes the latent, ``kv_a_layernorm(c) = w * c / rms(c)``; GQLA
  has no such norm. The export makes it an identity to float32 rounding: ``kv_lora_rank`` becomes
  ``r + 1``, the extra latent coordinate has a zero ``kv_a_proj_with_mqa`` row and bias ``M``, so the
  norm sees ``[c ; M]`` and its output on the first ``r`` dims is
  ``w c sqrt(r + 1) / sqrt(|c|^2 + M^2 + (r + 1) eps)``. ``M`` is chosen per layer at least
  ``2^14`` times a worst-case bound of ``|c|`` (``||W_DKV diag(input_layernorm)||_2 sqrt(D) + |b_DKV|``,
  since the normalized attention input has norm at most ``sqrt(D)`` before its weight), so
  ``|c|^2 / M^2 < 2^-28``: the norm's scale is constant to < 2e-9 relative, under float32 resolution.
  ``w`` is ``M / sqrt(r + 1)`` rounded to the checkpoint dtype; ``M``'s mantissa is searched so that
  the residual constant ``s = w sqrt(r + 1) / sqrt(M^2 + (r + 1) eps)`` is as close to 1 as the dtype
  allows (typically ``|s - 1| ~ 1e-11`` in float32; in bfloat16 ``~1e-5``, up to ~1e-3 when ``sqrt(r + 1)``
  sits just off a power of two, e.g. ``r = 1024``), and a residual beyond an eighth of the dtype's
  epsilon is folded into ``kv_b_proj``. The extra coordinate's norm weight is 0, so the cache holds
  ``[c ; 0]``, and its ``kv_b_proj`` column is 0. float16 caps ``M`` at ``2^15`` (range); the config
  records each layer's worst-case bound. Runtimes computing in half precision round the norm's output
  once more (DeepSeek's RMSNorm casts before applying its weight); in float16 the intermediate
  ``c sqrt(r + 1) / M`` can fall into the subnormal range, so prefer bfloat16 or float32 compute.
* **Biases.** ``attention_bias: true`` gives ``kv_a_proj_with_mqa`` (latent bias, ``M``, RoPE-key bias)
  and ``o_proj`` a bias. GQLA's nope-key bias (``kv_b_proj.bias`` key rows) only shifts every score of a
  query by the same amount, which softmax ignores: dropped. Its value bias is carried exactly through
  ``o_proj.bias``: attention probabilities sum to one, so a value bias ``b_h`` adds ``W_O [b_h]_h`` to
  the output whatever the probabilities (computed in float64, added to GQLA's ``o_proj.bias`` if any).
  A **query** bias (Qwen2) has no slot: DeepSeek's ``q_proj`` has no bias, so such checkpoints are refused,
  unless ``query_bias_lora`` (CLI ``--q-lora-bias``) is set: then the query is written in DeepSeek's
  factorized form with ``q_lora_rank = D + 1``: ``q_a_proj = [I ; 0]`` with bias ``[0 ; M_q]`` (``M_q`` from
  the bound ``|x| <= max|input_layernorm| sqrt(D)``), ``q_a_layernorm`` pinned like the latent norm (weight
  ``w_q`` on the ``D`` real dims, 1 on the constant one), and ``q_b_proj = [W_q | b_q / u]`` where
  ``u = sqrt(D + 1) M_q / sqrt(M_q^2 + (D + 1) eps)`` is the constant coordinate after the norm. Exact to
  float32 rounding, at the cost of a ``(D + 1) x D`` identity per layer.
* Tied embeddings are written untied (``lm_head.weight`` = a copy of the embedding).

A source ``sliding_window`` smaller than ``max_position_embeddings`` (Mistral) has no DeepSeek-V3
equivalent: the export attends to the full context, and says so in its warnings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedError
from ..io import TensorSpec
from ..io.safetensors_format import to_torch_dtype
from ..mathx.rope import rope_settings
from ..source_checkpoint import natural_key
from .gqla_paths import export_info, finish
from .source import GQLACheckpoint, write_planned

LATENT_NORM_EPS = 1e-6  # DeepseekV3RMSNorm(kv_lora_rank) is built without config eps: its default
HEADROOM_BITS = 14  # M >= 2^14 |c|_max  =>  |c|^2 / M^2 <= 2^-28
MANTISSA_BITS = {"F32": 23, "F64": 52, "BF16": 7, "F16": 10}
MAX_EXPONENT = {"F16": 15}  # float16 holds values < 65504: M <= 2^15 (1 + ...)
DEFAULT_MAX_EXPONENT = 40
_PASS_THROUGH = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight|"
    r"model\.layers\.\d+\.self_attn\.(q_proj|o_proj)\.weight)$"
)
_REPLACED = re.compile(r"^model\.layers\.\d+\.self_attn\.(kv_a_proj_with_mqa\.(weight|bias)|kv_b_proj\.(weight|bias)|o_proj\.bias)$")
QUERY_BIAS_MESSAGE = ("{arch} query bias has no slot in DeepSeek-V3's q_proj; export --format gqla instead "
                      "(or pass --q-lora-bias to carry it through a q_lora_rank = hidden_size + 1 factorization)")


@dataclass
class NormPin:
    """How one layer's latent RMSNorm is pinned to the identity."""

    bias: float  # M, the constant latent coordinate (exact in the checkpoint dtype)
    weight: float  # w, the norm weight of the r real latent dims (in the checkpoint dtype)
    scale: float  # s = w sqrt(r+1) / sqrt(M^2 + (r+1) eps): the norm's output is s c
    bound: float  # worst-case |c| over all inputs
    folded: bool  # whether 1/s was folded into kv_b_proj

    @property
    def worst_rel_error(self) -> float:
        """Worst-case relative deviation of the norm's scale from s: |c|^2 / (2 M^2)."""
        return self.bound**2 / (2 * self.bias**2)

    def to_dict(self) -> dict[str, Any]:
        return {"M": self.bias, "weight": self.weight, "residual_scale": self.scale, "c_bound": self.bound,
                "worst_rel_error": self.worst_rel_error, "residual_folded": self.folded}


def pin_norm(bound: float, dim: int, dtype: str, eps: float = LATENT_NORM_EPS) -> NormPin:
    """Choose ``M`` (>= 2^14 bound, exact in ``dtype``) and ``w`` (``dtype``) with ``s`` closest to 1."""
    bound = max(float(bound), 1e-3)
    exp = min(math.ceil(math.log2(bound)) + HEADROOM_BITS, MAX_EXPONENT.get(dtype, DEFAULT_MAX_EXPONENT))
    bits = min(MANTISSA_BITS.get(dtype, 23), 12)
    tdt = to_torch_dtype(dtype)
    j = torch.arange(2**bits, dtype=torch.float64)
    m = 2.0**exp * (1 + j / 2**bits)
    if dtype == "F16":
        m = m[m <= torch.finfo(torch.float16).max]
    w = (m / math.sqrt(dim)).to(tdt).to(torch.float64)
    s = w * math.sqrt(dim) / torch.sqrt(m * m + dim * eps)
    best = int((s - 1).abs().argmin())
    scale = float(s[best])
    fold = abs(scale - 1) > torch.finfo(tdt).eps / 8
    return NormPin(float(m[best]), float(w[best]), scale, bound, fold)


def latent_bound(src: GQLACheckpoint, layer: int) -> float:
    """Max of ``|c| = |W_DKV x + b_DKV|`` over every input ``x = ln_w * u`` with ``|u| <= sqrt(D)``."""
    geo = src.geo
    w_c = src.read64(src.attn(layer, "kv_a_proj_with_mqa.weight"))[: geo.rank]
    ln = src.read64(f"model.layers.{layer}.input_layernorm.weight")
    if ln is not None:
        w_c = w_c * ln[None, :]
    bias = src.read64(src.attn(layer, "kv_a_proj_with_mqa.bias"))
    b = float(bias[: geo.rank].norm()) if bias is not None else 0.0
    return float(torch.linalg.matrix_norm(w_c, ord=2)) * math.sqrt(geo.hidden) + b


def _source_arch(src: GQLACheckpoint) -> str:
    arch = ((src.config.get("gqla") or {}).get("source") or {}).get("architecture") or "the source's"
    return {"Qwen2ForCausalLM": "Qwen2"}.get(arch, arch)


def has_query_bias(src: GQLACheckpoint) -> bool:
    names = [src.attn(l, "q_proj.bias") for l in range(src.geo.n_layers)]
    return any(n in src.ckpt and bool(src.ckpt.read(n).any()) for n in names)


def check_supported(src: GQLACheckpoint, query_bias_lora: bool = False) -> list[str]:
    """Refuse what stock DeepSeek-V3 cannot express (one-line UnsupportedError); return warnings."""
    geo, cfg = src.geo, src.config
    warnings: list[str] = []
    if has_query_bias(src):
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
    return warnings


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    base, scaling = rope_settings(cfg)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": base}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"})
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return params


DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def deepseek_config(src: GQLACheckpoint, pins: list[NormPin], info: dict[str, Any]) -> dict[str, Any]:
    geo, cfg = src.geo, src.config
    inter = int(cfg["intermediate_size"])
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
        "n_routed_experts": 1,
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
        "kv_lora_rank": geo.rank + 1,
        "qk_nope_head_dim": geo.d_nope,
        "qk_rope_head_dim": geo.d_rope,
        "v_head_dim": geo.d_v,
        "head_dim": geo.d_rope,
        "rope_interleave": True,
        "rope_parameters": rope_parameters(cfg),
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 4096),
        "hidden_act": geo.hidden_act,
        "rms_norm_eps": geo.eps,
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        "attention_bias": True,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "dtype": DTYPE_NAMES[src.dtype],
        "transgqla": {
            **info,
            "latent_norm": {
                "how": "kv_lora_rank = GQLA rank + 1; the last latent coordinate is the constant M (zero kv_a row, "
                       "bias M, norm weight 0, zero kv_b column) so kv_a_layernorm scales the GQLA latent by "
                       "residual_scale (folded into kv_b_proj when residual_folded)",
                "layers": [p.to_dict() for p in pins],
            },
            "gqla": {k: cfg["gqla"].get(k) for k in ("format_version", "source", "conversion")},
        },
    }


def input_bound(src: GQLACheckpoint, layer: int) -> float:
    """Max of ``|x|`` for the attention input ``x = ln_w * u``, ``|u| <= sqrt(D)``."""
    ln = src.read64(f"model.layers.{layer}.input_layernorm.weight")
    return (float(ln.abs().max()) if ln is not None else 1.0) * math.sqrt(src.geo.hidden)


def query_lora(src: GQLACheckpoint, layer: int, pin: NormPin, tdt: torch.dtype) -> dict[str, torch.Tensor]:
    """``q_a_proj`` (+bias), ``q_a_layernorm``, ``q_b_proj`` carrying ``q_proj`` and its bias exactly."""
    d = src.geo.hidden
    w_q = src.read64(src.attn(layer, "q_proj.weight"))
    b_q = src.read64(src.attn(layer, "q_proj.bias"))
    b_q = torch.zeros(w_q.shape[0], dtype=torch.float64) if b_q is None else b_q
    q_a = torch.cat((torch.eye(d, dtype=tdt), torch.zeros(1, d, dtype=tdt)))
    q_a_bias = torch.zeros(d + 1, dtype=torch.float64)
    q_a_bias[-1] = pin.bias
    norm_w = torch.full((d + 1,), pin.weight, dtype=torch.float64)
    norm_w[-1] = 1.0
    u = math.sqrt(d + 1) * pin.bias / math.sqrt(pin.bias**2 + (d + 1) * LATENT_NORM_EPS)
    w = src.ckpt.read(src.attn(layer, "q_proj.weight"))
    if pin.folded:
        w = (w_q / pin.scale).to(tdt)
    q_b = torch.cat((w.to(tdt), (b_q / u).to(tdt)[:, None]), dim=1)
    return {"q_a_proj.weight": q_a, "q_a_proj.bias": q_a_bias.to(tdt), "q_a_layernorm.weight": norm_w.to(tdt),
            "q_b_proj.weight": q_b}


def write_deepseek(src: GQLACheckpoint, folder: Path, max_shard_bytes: int, warnings: list[str],
                   query_bias_lora: bool = False) -> dict[str, Any]:
    geo, dtype = src.geo, src.dtype
    tdt = to_torch_dtype(dtype)
    r1, m = geo.rank + 1, geo.heads_per_group
    pins = [pin_norm(latent_bound(src, l), r1, dtype) for l in range(geo.n_layers)]
    use_q_lora = query_bias_lora and has_query_bias(src)
    q_pins = [pin_norm(input_bound(src, l), geo.hidden + 1, dtype) for l in range(geo.n_layers)] if use_q_lora else []
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
    specs = [src.ckpt.spec(n) for n in src.ckpt.names
             if _PASS_THROUGH.match(n) and not (use_q_lora and n.endswith("self_attn.q_proj.weight"))]
    aliases = {}
    if "lm_head.weight" not in src.ckpt:
        emb = src.ckpt.spec("model.embed_tokens.weight")
        specs.append(TensorSpec("lm_head.weight", emb.dtype, emb.shape))
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    computed = {src.attn(l, rel) for l in range(geo.n_layers) for rel in shapes}
    specs += [TensorSpec(n, dtype, shapes[n.split("self_attn.")[1]]) for n in computed]
    specs.sort(key=lambda s: natural_key(s.name))

    def compute(layer: int) -> dict[str, torch.Tensor]:
        pin = pins[layer]
        a = src.ckpt.read(src.attn(layer, "kv_a_proj_with_mqa.weight"))
        zero_row = torch.zeros(1, geo.hidden, dtype=a.dtype)
        kv_a = torch.cat((a[: geo.rank], zero_row, a[geo.rank :]))
        a_bias = src.read64(src.attn(layer, "kv_a_proj_with_mqa.bias"))
        if a_bias is None:
            a_bias = torch.zeros(geo.rank + geo.d_rope, dtype=torch.float64)
        kv_a_bias = torch.cat((a_bias[: geo.rank], torch.tensor([pin.bias], dtype=torch.float64), a_bias[geo.rank :]))
        norm_w = torch.full((r1,), pin.weight, dtype=torch.float64)
        norm_w[-1] = 0.0
        b = src.ckpt.read(src.attn(layer, "kv_b_proj.weight")).view(geo.n_groups, geo.d_nope + geo.d_v, geo.rank)
        if pin.folded:
            b = (b.to(torch.float64) / pin.scale).to(tdt)
        b = b.repeat_interleave(m, dim=0)  # head h <- group h // m
        kv_b = torch.cat((b, torch.zeros(geo.n_heads, geo.d_nope + geo.d_v, 1, dtype=b.dtype)), dim=2)
        o_bias = src.read64(src.attn(layer, "o_proj.bias"))
        o_bias = torch.zeros(geo.hidden, dtype=torch.float64) if o_bias is None else o_bias
        b_bias = src.read64(src.attn(layer, "kv_b_proj.bias"))
        if b_bias is not None:  # value bias through o_proj (probabilities sum to 1); key bias: softmax-invariant
            b_v = b_bias.view(geo.n_groups, geo.d_nope + geo.d_v)[:, geo.d_nope :].repeat_interleave(m, dim=0)
            o_bias = o_bias + src.read64(src.attn(layer, "o_proj.weight")) @ b_v.reshape(-1)
        out = {
            "kv_a_proj_with_mqa.weight": kv_a, "kv_a_proj_with_mqa.bias": kv_a_bias, "kv_a_layernorm.weight": norm_w,
            "kv_b_proj.weight": kv_b.reshape(-1, r1), "o_proj.bias": o_bias,
        }
        if use_q_lora:
            out.update(query_lora(src, layer, q_pins[layer], tdt))
        return {src.attn(layer, k): v.to(tdt).contiguous() for k, v in out.items()}

    files = write_planned(src, folder, specs, computed, compute, max_shard_bytes, aliases=aliases)
    info = export_info(src, format="deepseek", path="absorb", folded=False, warnings=warnings)
    config = deepseek_config(src, pins, info)
    if use_q_lora:
        config["q_lora_rank"] = geo.hidden + 1
        config["transgqla"]["query_norm"] = {
            "how": "q_lora_rank = hidden_size + 1 carries the query bias: q_a_proj = [I ; 0] with bias [0 ; M], "
                   "q_a_layernorm weight [w ... w, 1], q_b_proj = [W_q | b_q / u]",
            "layers": [p.to_dict() for p in q_pins],
        }
    finish(src, folder, config, files, remote_code=False, export_info={k: v for k, v in info.items() if k != "warnings"})
    worst = max(p.worst_rel_error for p in pins + q_pins)
    return {
        "tensors_written": len(specs), "bytes_written": sum(s.nbytes for s in specs), "tensors_byte_identical": False,
        "cache_values_per_token": r1 + geo.d_rope,
        "latent_norm": {"worst_case_rel_error": worst, "max_residual_scale_error": max(abs(p.scale - 1) for p in pins + q_pins),
                        "residual_folded_layers": sum(p.folded for p in pins + q_pins), "query_lora": use_q_lora},
    }
