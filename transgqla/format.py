"""GQLA checkpoint format v1: the one definition that ``convert`` writes, ``verify`` checks and ``export`` reads.

Why one room: other tools read these names and layouts (DESIGN.md section 4), so they may be stated once.
Later versions add keys, never rename.

A checkpoint folder:

============================================  ==============================================================
``config.json``                               the source's config plus the GQLA keys (:func:`build_config`)
``model-0000i-of-0000N.safetensors``          shards; header metadata :data:`WRITER_METADATA`
``model.safetensors.index.json``              tensor -> shard
``configuration_gqla.py``, ``modeling_gqla.py``  :data:`REMOTE_CODE` (``trust_remote_code=True`` loading)
tokenizer and generation files                :data:`COPIED_FILES`, from the source (data only, no ``auto_map``)
``transgqla-manifest.json``                   :data:`MANIFEST`: sha256 of every other file
============================================  ==============================================================

Attention of layer ``l`` (``model.layers.{l}.self_attn.``; ``[out, in]``), sizes as in :class:`AttentionDims`:

===============================  ===========================  ===============================================
``q_proj.weight``                ``[n_h (d_nope + d_R), D]``  per head: ``d_nope`` nope rows, then ``d_R`` RoPE
``kv_a_proj_with_mqa.weight``    ``[r + d_R, D]``             ``r`` latent rows, then the ``d_R`` RoPE-key rows
``kv_b_proj.weight``             ``[n_g (d_nope + d_v), r]``  per group: ``d_nope`` key rows, then ``d_v`` value
``o_proj.weight``                ``[D, n_h d_v]``             the source's, unchanged
``*.bias``                       matching                     q/kv_a/kv_b when ``attention_bias``; o_proj when
                                                              ``o_proj_bias``
===============================  ===========================  ===============================================

RoPE rows are interleaved (pair ``p`` = dims ``2p, 2p + 1``, ``rope_interleave: true``); softmax scale
``1/sqrt(d_nope + d_R)``. Every tensor outside attention is the source's, byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import TransGQLAError
from .mathx.rope import rope_settings

if TYPE_CHECKING:  # duck-typed: the format reads a few fields of each
    from .settings import ConversionSettings
    from .source_geometry import SourceGeometry

FORMAT_VERSION = 1
ARCHITECTURE = "GQLAForCausalLM"
MODEL_TYPE = "gqla"
DECODE_PATHS = ("absorb", "gqa")
AUTO_MAP = {"AutoConfig": "configuration_gqla.GQLAConfig", "AutoModelForCausalLM": "modeling_gqla.GQLAForCausalLM"}
MANIFEST = "transgqla-manifest.json"
REMOTE_CODE = ("configuration_gqla.py", "modeling_gqla.py")
#: The tokenizer and generation files a checkpoint carries from its source: exact names, data only, never code
#: (:mod:`transgqla.data_files` copies them under the shard rule).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
#: Keys of copied files that name code shipped beside them (loaded by ``trust_remote_code=True``): dropped.
CODE_POINTERS = {"tokenizer_config.json": ("auto_map",)}
#: Shard size cap when none is given: 5 GB, decimal (5 * 10**9 bytes), as Hugging Face's ``max_shard_size="5GB"``.
DEFAULT_SHARD_BYTES = 5 * 10**9
WRITER_METADATA = {"gqla_format_version": str(FORMAT_VERSION)}  # in every shard header
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: Config keys that must be positive integers.
INT_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
    "vocab_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)
#: The attention tensors a conversion computes (``o_proj`` is the source's), relative to ``self_attn.``.
CONVERTED = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def json_bytes(obj: Any) -> bytes:
    """How the checkpoint's JSON files are written: sorted keys, indent 2, a final newline (deterministic)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def manifest(files: dict[str, str], export: dict[str, Any] | None = None,
             sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The manifest document: ``{file: sha256}`` of every other file, ``{file: bytes}`` when known (checked
    before OUT is committed, and by verify), and, for an export, where it came from."""
    doc: dict[str, Any] = {"format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))}
    if sizes is not None:
        doc["sizes"] = {name: int(sizes[name]) for name in sorted(files)}
    if export is not None:
        doc["export"] = export
    return doc


# -- attention layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionDims:
    """The sizes the attention layout depends on (their ``config.json`` keys in the comments)."""

    hidden: int  # hidden_size, D
    n_heads: int  # num_attention_heads, n_h
    n_groups: int  # num_key_value_heads, n_g (the GQA path's KV heads)
    d_nope: int  # qk_nope_head_dim (the source's head dim: each head keeps its own query)
    d_rope: int  # qk_rope_head_dim, d_R
    d_v: int  # v_head_dim (the source's head dim)
    rank: int  # kv_lora_rank, r

    @classmethod
    def of_conversion(cls, geo: SourceGeometry, settings: ConversionSettings) -> AttentionDims:
        return cls(geo.hidden, geo.n_heads, geo.n_groups, geo.head_dim, settings.qk_rope_head_dim, geo.head_dim,
                   settings.kv_lora_rank)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> AttentionDims:
        """From a GQLA config (KeyError / TypeError / ValueError when a key is missing or not a number)."""
        keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "kv_lora_rank")
        return cls(*(int(cfg[k]) for k in keys))

    def config_keys(self) -> dict[str, Any]:
        """The GQLA keys of ``config.json`` (the query is never factorized in v1: ``q_lora_rank`` null)."""
        return {"kv_lora_rank": self.rank, "q_lora_rank": None, "qk_nope_head_dim": self.d_nope,
                "qk_rope_head_dim": self.d_rope, "v_head_dim": self.d_v, "num_key_value_heads": self.n_groups}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every attention tensor of a layer, weights and biases, named relative to ``self_attn.``."""
        q, kv_a, kv_b = self.n_heads * (self.d_nope + self.d_rope), self.rank + self.d_rope, self.n_groups * (
            self.d_nope + self.d_v)
        return {
            "q_proj.weight": (q, self.hidden), "kv_a_proj_with_mqa.weight": (kv_a, self.hidden),
            "kv_b_proj.weight": (kv_b, self.rank), "o_proj.weight": (self.hidden, self.n_heads * self.d_v),
            "q_proj.bias": (q,), "kv_a_proj_with_mqa.bias": (kv_a,), "kv_b_proj.bias": (kv_b,),
            "o_proj.bias": (self.hidden,),
        }


def converted_names(bias: bool) -> list[str]:
    """The tensors a conversion writes per layer, in this order, relative to ``self_attn.``."""
    kinds = ("weight", "bias") if bias else ("weight",)
    return [f"{t}.{k}" for k in kinds for t in CONVERTED]


def attention_tensors(cfg: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) attention tensors of every layer of a contract-valid config, relative to
    ``self_attn.``. ``o_proj.bias``: Llama with ``attention_bias`` has one, Qwen2 none; a config that says
    (``o_proj_bias``) is held to it, one that does not may have it."""
    shapes = AttentionDims.from_config(cfg).shapes()
    names = [f"{t}.weight" for t in CONVERTED] + ["o_proj.weight"]
    names += [f"{t}.bias" for t in CONVERTED] if cfg.get("attention_bias") else []
    required = {n: shapes[n] for n in names}
    optional: dict[str, tuple[int, ...]] = {}
    if "o_proj_bias" not in cfg:
        optional["o_proj.bias"] = shapes["o_proj.bias"]
    elif cfg["o_proj_bias"]:
        required["o_proj.bias"] = shapes["o_proj.bias"]
    return required, optional


# -- config.json ------------------------------------------------------------------------------------


def cache_sizes(geo: SourceGeometry, s: ConversionSettings) -> dict[str, Any]:
    """KV-cache values per token per layer of the source and of both GQLA paths (DESIGN.md section 2)."""
    dims = AttentionDims.of_conversion(geo, s)
    source = geo.kv_values_per_token
    sizes: dict[str, Any] = {
        "source_gqa": source,
        "absorb": dims.rank + dims.d_rope,
        "gqa": dims.n_groups * (dims.d_nope + dims.d_rope + dims.d_v),
        "gqa_shared_rope": dims.n_groups * (dims.d_nope + dims.d_v) + dims.d_rope,
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
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` of a converted checkpoint: the source's keys with the GQLA ones over them."""
    cfg = {k: v for k, v in source_config.items() if k not in ("auto_map", "_name_or_path", "transformers_version")}
    cfg.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        auto_map=dict(AUTO_MAP),
        **AttentionDims.of_conversion(geo, settings).config_keys(),
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
                       "calibration": calibration, "environment": environment},
        "layers": layer_reports,
    }
    return cfg


def config_problems(cfg: dict[str, Any]) -> list[str]:
    """Every way ``cfg`` breaks the format contract; empty when it holds."""
    p: list[str] = []
    if cfg.get("architectures") != [ARCHITECTURE]:
        p.append(f"architectures is {cfg.get('architectures')!r}, expected [{ARCHITECTURE!r}]")
    if cfg.get("model_type") != MODEL_TYPE:
        p.append(f"model_type is {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")
    if cfg.get("auto_map") != AUTO_MAP:  # exactly: anything else makes trust_remote_code=True run other code
        p.append("auto_map must name " + " and ".join(f"{k}: {v}" for k, v in AUTO_MAP.items()) + " and nothing "
                 f"else, got {cfg.get('auto_map')!r}"[:300])
    for key in INT_KEYS:
        v = cfg.get(key)
        if key not in cfg:
            p.append(f"required key {key} is missing")
        elif type(v) is not int or v <= 0:
            p.append(f"{key} must be a positive integer, got {v!r}")
    if "q_lora_rank" not in cfg:
        p.append("required key q_lora_rank is missing")
    elif cfg["q_lora_rank"] is not None:
        p.append(f"q_lora_rank is {cfg['q_lora_rank']!r}; format v1 verification expects null (unfactorized q_proj)")
    if cfg.get("rope_interleave") is not True:
        p.append(f"rope_interleave is {cfg.get('rope_interleave')!r}, expected true")
    n_h, n_g = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if type(n_h) is int and type(n_g) is int and n_g > 0 and n_h % n_g:
        p.append(f"num_key_value_heads {n_g} does not divide num_attention_heads {n_h}")
    d_r = cfg.get("qk_rope_head_dim")
    if type(d_r) is int and d_r % 2:
        p.append(f"qk_rope_head_dim {d_r} must be even (interleaved RoPE pairs)")
    try:
        rope_settings(cfg)
    except TransGQLAError as exc:
        p.append(str(exc))
    except (TypeError, ValueError, KeyError) as exc:
        p.append(f"rope settings are unreadable: {exc!r}")
    g = cfg.get("gqla")
    if not isinstance(g, dict):
        p.append("required object gqla is missing")
        return p
    if g.get("format_version") != FORMAT_VERSION:
        p.append(f"gqla.format_version is {g.get('format_version')!r}, expected {FORMAT_VERSION}")
    if g.get("decode_path") not in DECODE_PATHS:
        p.append(f"gqla.decode_path is {g.get('decode_path')!r}, expected one of {', '.join(DECODE_PATHS)}")
    if not isinstance(g.get("source"), dict):
        p.append("gqla.source (the source's identity) is missing")
    return p
