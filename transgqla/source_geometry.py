"""The source model's geometry, read once from and checked against its ``config.json``.

One validated reading: the attention geometry (heads, groups, head dim, RoPE), the family and its
whole block (:class:`~transgqla.families.Block`: names and conventions). The reference decoder's
per-layer attention geometry (:class:`~transgqla.model.source_attention.GQAGeometry`) derives from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError, UnsupportedError
from .families import Block, Family, family_for
from .mathx.rope import rope_settings

REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


@dataclass(frozen=True)
class SourceGeometry:
    family: Family
    architecture: str
    hidden: int
    n_heads: int
    n_groups: int
    head_dim: int
    n_layers: int
    qkv_bias: bool
    rope_base: float
    rope_scaling: dict[str, Any] | None
    block: Block

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_groups

    @property
    def softmax_scale(self) -> float:
        """The source's softmax scale: ``query_pre_attn_scalar ** -0.5`` where the family sets one
        (Gemma2), else ``head_dim ** -0.5``; conversion folds it into the query weights."""
        if self.block.attention_scale is not None:  # Granite states the scale itself
            return self.block.attention_scale
        return 1.0 / math.sqrt(self.block.query_scalar or self.head_dim)

    @property
    def kv_values_per_token(self) -> int:
        """Source GQA cache per token per layer: ``2 n_g d`` values."""
        return 2 * self.n_groups * self.head_dim


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"config.json: '{key}' must be a positive integer, found {value!r}")
    return value


DEQUANTIZE_HINT = "dequantize it to bfloat16 or float16 first (load it with transformers and save_pretrained)"


def refuse_quantized_config(config: dict[str, Any]) -> None:
    """A quantized source's stored weights are codes, not the weights: converting them is meaningless."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else "unknown method"
        raise UnsupportedError(f"the source is quantized (quantization_config: {method}); {DEQUANTIZE_HINT}")


def read_geometry(config: dict[str, Any]) -> SourceGeometry:
    """Validate a source config and return its geometry (one-line errors for every inconsistency)."""
    family = family_for(config)
    refuse_quantized_config(config)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise InputError(f"config.json is missing required keys: {', '.join(missing)}")
    hidden, n_heads = _int(config, "hidden_size"), _int(config, "num_attention_heads")
    n_groups = _int(config, "num_key_value_heads") if config.get("num_key_value_heads") is not None else n_heads
    if n_heads % n_groups:
        raise InputError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_groups}")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise InputError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
        head_dim = hidden // n_heads
    else:
        head_dim = _int(config, "head_dim")
    if head_dim % 2:
        raise InputError(f"config.json: head_dim {head_dim} is odd; RoPE needs pairs of dimensions")
    family.refuse(config)
    try:
        base, scaling = rope_settings(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"config.json: unreadable RoPE settings (rope_theta / rope_scaling / rope_parameters): {exc}".splitlines()[0]) from None
    if not math.isfinite(base) or base <= 1.0:
        raise InputError(f"config.json: rope_theta must be a finite number above 1, found {base!r}")
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise InputError(f"config.json: rms_norm_eps must be a finite positive number, found {eps!r}")
    try:
        block = family.block(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"config.json: the {family.name} block's settings cannot be read ({type(exc).__name__}: "
                         f"{exc})".splitlines()[0]) from None
    return SourceGeometry(
        family=family,
        architecture=config["architectures"][0],
        hidden=hidden,
        n_heads=n_heads,
        n_groups=n_groups,
        head_dim=head_dim,
        n_layers=_int(config, "num_hidden_layers"),
        qkv_bias=family.has_qkv_bias(config),
        rope_base=base,
        rope_scaling=scaling,
        block=block,
    )
