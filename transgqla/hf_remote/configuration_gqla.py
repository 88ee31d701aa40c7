"""GQLA (Group-Query Latent Attention) configuration for Hugging Face ``transformers``.

This file travels inside converted checkpoints (``auto_map`` in ``config.json``); it imports only
torch and transformers. Works with transformers 4.45+ and 5.x.

A GQLA checkpoint is its source's decoder (the block recorded in ``gqla["family"]``: norm names and
convention, dense / fused / mixture-of-experts MLP, embedding and logit scales, soft-caps, per-layer
sliding windows; see :meth:`GQLAConfig.gqla_block`) whose attention caches a latent ``c`` (``kv_lora_rank``
values) plus one RoPE key (``qk_rope_head_dim`` values) per token, and expands them with one
up-projection per KV group (``num_key_value_heads`` groups). Two decoding paths run on the same
weights:

* ``"absorb"``: caches ``[c ; k_R]`` only (MLA/MQA-like);
* ``"gqa"``: caches ordinary per-group keys and values (``num_key_value_heads`` KV heads).

The default path is ``config.gqla["decode_path"]``. Choose another one with
``from_pretrained(path, trust_remote_code=True, decode_path="gqa")``, ``config.decode_path = "gqa"``
or ``model.set_decode_path("gqa")``; ``decode_path`` is stored inside the ``gqla`` dict, so a saved
config keeps the choice under the format's own key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PretrainedConfig

DECODE_PATHS = ("absorb", "gqa")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def gqla_rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(base, scaling)`` from ``rope_parameters`` (transformers 5 spelling) or ``rope_theta`` +
    ``rope_scaling`` (4.x spelling); ``scaling`` is None for plain RoPE."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        base = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = getattr(config, "rope_theta", None)
        base = float(theta) if theta is not None else 10000.0
        raw = getattr(config, "rope_scaling", None)
        scaling = dict(raw) if raw else None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"GQLA: rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if kind == "default":
            scaling = None
    return base, scaling


def gqla_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Angular frequency (rad/token, float64) of each of the ``dim/2`` interleaved RoPE pairs:
    ``base^(-2p/dim)``, then the source's scaling (same numbers as transgqla's converter).

    ``dynamic`` is plain RoPE: identical to the source up to its original context length."""
    w = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return w
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return w / float(scaling["factor"])
    if kind == "dynamic":
        return w
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / w
        scaled = torch.where(wavelen > old_len / low, w / factor, w)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"GQLA: rope scaling {kind!r} is not supported")


class GQLAConfig(PretrainedConfig):
    """Configuration of a GQLA causal LM (format_version 1).

    Attention geometry: ``num_attention_heads`` query heads in ``num_key_value_heads`` groups; per
    head a query of ``qk_nope_head_dim + qk_rope_head_dim`` dims and a value of ``v_head_dim``;
    a shared latent of ``kv_lora_rank`` dims. ``decode_path`` (a property backed by
    ``gqla["decode_path"]``) selects the decoding path.
    """

    model_type = "gqla"
    _auto_class = "AutoConfig"  # save_pretrained copies this file and writes auto_map
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = None,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        rope_interleave: bool = True,
        attention_bias: bool = False,
        o_proj_bias: bool | None = None,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        sliding_window: int | None = None,
        use_sliding_window: bool | None = None,
        layer_types: list[str] | None = None,
        gqla: dict | None = None,
        **kwargs,
    ):
        # An explicit ``decode_path=...`` (config kwarg) wins over gqla["decode_path"].
        decode_path = kwargs.pop("decode_path", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_interleave = rope_interleave
        self.attention_bias = attention_bias
        self.o_proj_bias = o_proj_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.use_sliding_window = use_sliding_window
        self.layer_types = layer_types
        gqla = dict(gqla) if gqla else {}
        gqla.setdefault("format_version", 1)
        gqla.setdefault("decode_path", "absorb")
        self.gqla = gqla
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base class so that no transformers version rewrites the RoPE settings
        # (transformers 5 "standardizes" them into rope_parameters).
        self.tie_word_embeddings = tie_word_embeddings
        self._set_rope(rope_theta, rope_scaling, rope_parameters)
        if decode_path is not None:
            self.decode_path = decode_path
        else:
            self._check_path(self.gqla["decode_path"])
        if num_attention_heads % num_key_value_heads:
            raise ValueError("GQLA: num_attention_heads must be a multiple of num_key_value_heads")

    def _set_rope(self, rope_theta, rope_scaling, rope_parameters) -> None:
        """Store RoPE settings as ``rope_parameters`` (always) and, on transformers 4.x, also as
        ``rope_theta`` + ``rope_scaling``. Set after the base class so that no transformers version
        rewrites them (5.x "standardizes" RoPE settings and aliases ``rope_scaling`` to
        ``rope_parameters``)."""

        class _Raw:
            pass

        raw = _Raw()
        raw.rope_parameters, raw.rope_theta, raw.rope_scaling = rope_parameters, rope_theta, rope_scaling
        base, scaling = gqla_rope_settings(raw)
        scaling = dict(scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))
        self.rope_parameters = {"rope_type": kind, **scaling, "rope_theta": base}
        if not isinstance(getattr(type(self), "rope_scaling", None), property):  # transformers 4.x
            self.rope_theta = base
            self.rope_scaling = {"rope_type": kind, **scaling} if kind != "default" else None

    @staticmethod
    def _check_path(path: str) -> str:
        if path not in DECODE_PATHS:
            raise ValueError(f"GQLA: unknown decode path {path!r}; choose one of {DECODE_PATHS}")
        return path

    @property
    def decode_path(self) -> str:
        """The decoding path the model uses: ``"absorb"`` or ``"gqa"`` (stored in ``gqla``)."""
        return self.gqla["decode_path"]

    @decode_path.setter
    def decode_path(self, path: str) -> None:
        self.gqla = {**self.gqla, "decode_path": self._check_path(path)}

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """Frequencies (float64, rad/token) of the ``qk_rope_head_dim / 2`` interleaved RoPE pairs."""
        base, scaling = gqla_rope_settings(self)
        return gqla_inv_freq(self.qk_rope_head_dim, base, scaling)

    def gqla_block(self) -> dict[str, Any]:
        """The decoder block this checkpoint holds: ``gqla["family"]`` (written by transgqla: tensor
        names and conventions of the source family); a Llama block for a checkpoint without one."""
        rec = dict((self.gqla or {}).get("family") or {})
        mlp = {"kind": "gated", "module": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
               "gate_up": None, "router": None, "experts": None, "n_experts": 0, "top_k": 0, **(rec.get("mlp") or {})}
        out = {"name": "llama", "attn_in": "input_layernorm", "attn_out": None, "mlp_in": "post_attention_layernorm",
               "mlp_out": None, "norm_offset": 0.0, "embed_scale": False, "activation": self.hidden_act,
               "eps": self.rms_norm_eps, "attn_softcap": None, "final_softcap": None, "layer_windows": None,
               "embed_multiplier": None, "residual_multiplier": None, "logits_divisor": None}
        out.update({k: v for k, v in rec.items() if k != "mlp"})
        out["mlp"] = mlp
        return out

    def layer_sliding_window(self, layer_idx: int) -> int | None:
        """The sliding window of ``layer_idx`` (None: full attention)."""
        windows = self.gqla_block()["layer_windows"]
        if windows is not None:
            return windows[layer_idx] if layer_idx < len(windows) else None
        if not self.sliding_window or self.use_sliding_window is False:
            return None
        types = self.layer_types
        if types is not None and layer_idx < len(types) and types[layer_idx] != "sliding_attention":
            return None
        return int(self.sliding_window)

    def has_o_proj_bias(self) -> bool:
        """``o_proj`` carries a bias when the source's did: Llama with ``attention_bias`` does, Qwen2
        (q/k/v biases only) does not. An explicit ``o_proj_bias`` key decides when present."""
        if self.o_proj_bias is not None:
            return bool(self.o_proj_bias)
        if not self.attention_bias:
            return False
        source = (self.gqla or {}).get("source") or {}
        family = f"{source.get('model_type') or ''} {source.get('architecture') or ''}".lower()
        return "qwen2" not in family

    def kv_cache_values_per_token(self, path: str | None = None) -> int:
        """KV-cache values per token per layer on ``path`` (default: the configured path); the GQA
        path counts the RoPE key once per group, as stored by the modeling code."""
        path = self._check_path(path or self.decode_path)
        if path == "absorb":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_key_value_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


__all__ = ["GQLAConfig"]
