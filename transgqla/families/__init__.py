"""Model families transgqla converts, as a registry keyed by Hugging Face architecture name.

A family (``base.Family``) owns its whole decoder block: every weight name and convention as data
(``base.Block``), quirks as hooks. Adding a family is one module here that defines a row (and, when its
block has a part no existing family has, that part in the reference decoder and the runtime), not an
``if`` elsewhere. Registered: Llama, Mistral, Qwen2 (``llama.py``), Mixtral, Phi-3, Gemma2, Granite.
Refused with their reason: per-head QK-norm (Qwen3, Gemma3) and architectures not
listed.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError, UnsupportedError
from . import gemma2, granite, llama, mixtral, phi3
from .base import Block, Family, Mlp, layer_windows

FAMILIES: tuple[Family, ...] = (*llama.FAMILIES, *mixtral.FAMILIES, *phi3.FAMILIES, *gemma2.FAMILIES, *granite.FAMILIES)
REGISTRY: dict[str, Family] = {arch: fam for fam in FAMILIES for arch in fam.architectures}
BY_NAME: dict[str, Family] = {fam.name: fam for fam in FAMILIES}
# Known architectures refused with their reason (the generic message lists what is supported).
REFUSED: dict[str, str] = {
    "Qwen3ForCausalLM": "per-head QK-norm (q_norm/k_norm) is not expressible in GQLA format v1 (no key norm)",
    "Gemma3ForCausalLM": "per-head QK-norm (q_norm/k_norm) is not expressible in GQLA format v1 (no key norm)",
}

__all__ = ["Block", "Family", "Mlp", "FAMILIES", "REGISTRY", "family_for", "supported_architectures",
           "gqla_block", "layer_windows", "BY_NAME"]


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def family_for(config: dict[str, Any]) -> Family:
    """The family of a source config, or a one-line refusal naming what is supported."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1:
        raise InputError(f"config.json must name exactly one architecture, found {archs!r}")
    fam = REGISTRY.get(archs[0])
    if fam is None:
        why = f" ({REFUSED[archs[0]]})" if archs[0] in REFUSED else ""
        raise UnsupportedError(
            f"architecture {archs[0]} is not supported{why}; supported are {', '.join(supported_architectures())}"
        )
    return fam


def gqla_block(config: dict[str, Any]) -> Block:
    """The block a GQLA ``config.json`` describes: its ``gqla.family`` record; for a checkpoint written
    before the record existed, the source architecture's family (Llama's when none is named)."""
    gqla = config.get("gqla") or {}
    if isinstance(gqla.get("family"), dict):
        return Block.from_record(gqla["family"])
    arch = (gqla.get("source") or {}).get("architecture")
    fam = REGISTRY.get(arch) if arch else None
    return (fam or FAMILIES[0]).block(config)
