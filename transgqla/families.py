"""Model families transgqla converts, as a registry keyed by Hugging Face architecture name.

A family says where a layer's attention tensors live, whether q/k/v carry biases and which
source features it cannot convert. Adding a family is adding a row, not an ``if`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, UnsupportedError


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    qkv_bias: bool | None  # None: read the config's ``attention_bias``
    # Tensor-name fragments whose presence means a feature GQLA cannot express (e.g. per-head q/k norms).
    refused_tensors: tuple[str, ...] = ("self_attn.q_norm", "self_attn.k_norm")
    layer_prefix: str = "model.layers.{layer}."
    attention_names: dict[str, str] = field(
        default_factory=lambda: {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    )
    input_norm: str = "input_layernorm.weight"

    def has_qkv_bias(self, config: dict[str, Any]) -> bool:
        return bool(config.get("attention_bias", False)) if self.qkv_bias is None else self.qkv_bias

    def tensor(self, layer: int, part: str, kind: str = "weight") -> str:
        """Full tensor name, e.g. ``tensor(3, "q")`` -> ``model.layers.3.self_attn.q_proj.weight``."""
        return f"{self.layer_prefix.format(layer=layer)}{self.attention_names[part]}.{kind}"

    def norm(self, layer: int) -> str:
        return f"{self.layer_prefix.format(layer=layer)}{self.input_norm}"

    def attention_prefix(self, layer: int) -> str:
        return f"{self.layer_prefix.format(layer=layer)}self_attn."


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM",), qkv_bias=None),
    Family("mistral", ("MistralForCausalLM",), qkv_bias=False),
    Family("qwen2", ("Qwen2ForCausalLM",), qkv_bias=True),
)
REGISTRY: dict[str, Family] = {arch: fam for fam in FAMILIES for arch in fam.architectures}


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def family_for(config: dict[str, Any]) -> Family:
    """The family of a source config, or a one-line refusal naming what is supported."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1:
        raise InputError(f"config.json must name exactly one architecture, found {archs!r}")
    fam = REGISTRY.get(archs[0])
    if fam is None:
        raise UnsupportedError(
            f"architecture {archs[0]} is not supported; supported are {', '.join(supported_architectures())}"
        )
    return fam
