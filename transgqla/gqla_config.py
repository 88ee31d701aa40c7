"""Build the GQLA ``config.json`` (format contract, DESIGN.md section 4) from the source config."""

from __future__ import annotations

from typing import Any

from . import __version__
from .settings import ConversionSettings
from .source_geometry import SourceGeometry

FORMAT_VERSION = 1
AUTO_MAP = {
    "AutoConfig": "configuration_gqla.GQLAConfig",
    "AutoModelForCausalLM": "modeling_gqla.GQLAForCausalLM",
}


def cache_sizes(geo: SourceGeometry, s: ConversionSettings) -> dict[str, Any]:
    """KV-cache values per token per layer of the source and of both GQLA paths."""
    d, n_g, d_r, r = geo.head_dim, geo.n_groups, s.qk_rope_head_dim, s.kv_lora_rank
    source = geo.kv_values_per_token
    sizes = {
        "source_gqa": source,
        "absorb": r + d_r,
        "gqa": n_g * (d + d_r + d),
        "gqa_shared_rope": n_g * (d + d) + d_r,
    }
    sizes["absorb_ratio"] = sizes["absorb"] / source
    sizes["gqa_ratio"] = sizes["gqa"] / source
    sizes["unit"] = "values per token per layer"
    return sizes


def build_config(
    source_config: dict[str, Any],
    geo: SourceGeometry,
    settings: ConversionSettings,
    source_identity: dict[str, Any],
    layer_reports: list[dict[str, float]],
    decode_path: str = "absorb",
    o_proj_bias: bool = False,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = {k: v for k, v in source_config.items() if k not in ("auto_map", "_name_or_path", "transformers_version")}
    cfg.update(
        architectures=["GQLAForCausalLM"],
        model_type="gqla",
        auto_map=dict(AUTO_MAP),
        kv_lora_rank=settings.kv_lora_rank,
        q_lora_rank=None,
        qk_nope_head_dim=geo.head_dim,
        qk_rope_head_dim=settings.qk_rope_head_dim,
        v_head_dim=geo.head_dim,
        num_key_value_heads=geo.n_groups,
        rope_interleave=True,
        attention_bias=geo.qkv_bias,
        o_proj_bias=o_proj_bias,
    )
    cfg["gqla"] = {
        "format_version": FORMAT_VERSION,
        "decode_path": decode_path,
        "cache_values_per_token": cache_sizes(geo, settings),
        "source": {**source_identity, "architecture": geo.architecture, "model_type": source_config.get("model_type")},
        "family": geo.block.record(),  # the whole decoder block the runtime and the reference decoders build
        "conversion": {"tool": "transgqla", "tool_version": __version__, **settings.to_dict(),
                       "calibration": calibration},
        "layers": layer_reports,
    }
    return cfg
